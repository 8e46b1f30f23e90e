"""Tracing in a worker process (``TraceConfig.worker = "process"``).

Why: the statistics, span building and export of a traced step are Python and numpy work. In a background
*thread* they share the traced process's GIL with the model thread, whose every kernel launch needs it; on a GPU
a few milliseconds of tracing work per step then stretch the step itself (measured in docs/performance.md). Here
that work runs in a separate interpreter, and the traced process keeps only what cannot move, all of it on the
caller's thread inside ``end_step``, so that no thread of the traced process wakes up per step:

end_step       one ``torch.cat`` of the step's selections and per-request vectors into one int32 buffer (capture.py);
(model thread) then, on a side stream after the snapshot's event, one DMA of that buffer into a shared-memory slot
               (page-locked with ``cudaHostRegister``) and a DMA of the step's token into the slot's header; then a
               small message (request ids, record layout, where each array sits in the slot, the token) written
               straight to the worker's socket. Nothing waits for the GPU: the worker waits until the token appears
               in the slot (the DMAs of one stream complete in order, so the data is there before it). On the CPU
               numpy copies the snapshot into the slot. Before taking a slot, ``poll`` reads the slots' done words:
               the worker writes a step's token there when it has finished with it, so giving a slot back needs no
               message either.
sender thread  only when the socket is full (the worker is behind): it writes what did not fit, in order.
receiver       answers to flush / stop and the worker's counters, a few times a second.
worker process ``python -m dsa_otel.worker``: an ordinary thread-mode pipeline (Materializer, span processors,
               exporters, summary.json) fed from the socket, so records are identical to thread mode. It sorts
               (numpy's SIMD sort), so the traced process launches no sort kernels.

Several workers (``worker_processes = n``): each owns the requests of every n-th JSONL shard (``owner_of``), so
every file has one writer. A step is written to one slot and its message to all n sockets (pickled once); each
worker turns its own requests' rows into spans and writes its own done word, and the slot is free when all live
workers have. Request lifecycle messages go to the owner only. At shutdown each worker returns its summary
accumulator and the traced process writes the merged summary.json.

Failure handling: if a worker dies, the traced process logs it once, counts the steps it can no longer hand over
(or whose share belonged to the dead worker) as failed and carries on; a crash of the traced process ends the
workers' input, and each then finishes and closes what it already has (its shards stay valid). The number of steps in flight is bounded by
``ring_slots`` in both processes, so a slow disk makes steps drop (counted), never block the model; a worker that
stops reading its socket altogether is declared lost once 64 MB of messages wait for it.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import mmap
import os
import pickle
import queue
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

import numpy as np
import structlog
import torch

from .capture import BatchGroup, KVReport, StepCapture
from .config import TraceConfig
from .kvfetch import KVFetchModel
from .materializer import Counters, side_stream

log = structlog.get_logger("dsa_otel.worker")

_ALIGN = 4096
_HEADER = 64  # a slot starts with int64 words: the token of the step it holds (written last), then one done word
#              per worker (config.MAX_WORKER_PROCESSES = 64 / 8 - 1)
READY_TIMEOUT_S = 60.0  # how long the worker waits for a step's data to land in its slot
STOP_TIMEOUT_S = 60.0  # how long shutdown waits for the worker to flush and close its files


def _reserve(fd: int, size: int, path: str, directory: str) -> None:
    """Size a slot file with its pages reserved: on a full tmpfs a sparse file maps fine and then kills the
    process with SIGBUS on first touch (a DMA into it, or the worker reading it); reserving turns that into
    ENOSPC here, where the step is dropped and counted. Filesystems without fallocate get a sparse file."""
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise OSError(exc.errno, f"cannot reserve a {size >> 20} MiB capture slot in {directory} "
                          f"({exc.strerror}): the step is dropped. Give it room (docker: --shm-size), point "
                          "TraceConfig.shm_dir (DSA_OTEL_SHM_DIR) at a larger tmpfs, or lower ring_slots",
                          path) from None
    os.ftruncate(fd, size)


class SharedSlot:
    """One capture slot's host buffer: a file in /dev/shm mapped by both processes. Grows by replacing the file
    (a new generation); the worker maps a path the first time a step names it."""

    def __init__(self, directory: str, tag: str, index: int) -> None:
        self.directory, self.tag, self.index = directory, tag, index
        self.generation = -1
        self.path = ""
        self.size = 0
        self._map: mmap.mmap | None = None
        self.array: np.ndarray | None = None
        self._header: np.ndarray | None = None
        self.registered = False

    def ensure(self, nbytes: int, pin: bool) -> np.ndarray:
        """A uint8 view of at least ``nbytes``, page-locked for DMA when ``pin`` (and the driver allows it)."""
        if nbytes > self.size:
            self._replace(max(nbytes, 2 * self.size, 1 << 20))
        if pin and not self.registered:
            self.registered = _host_register(self.array)  # type: ignore[arg-type]
        return self.array  # type: ignore[return-value]

    def _replace(self, size: int) -> None:
        size = -(-size // _ALIGN) * _ALIGN
        self.close()
        self.generation += 1
        self.path = os.path.join(self.directory, f"dsa-otel-{self.tag}-{self.index}-{self.generation}")
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            _reserve(fd, size, self.path, self.directory)
            self._map = mmap.mmap(fd, size)
        except OSError:
            os.unlink(self.path)
            self.path, self.size, self._map, self.array, self._header = "", 0, None, None, None
            raise
        finally:
            os.close(fd)
        self.size = size
        self.array = np.frombuffer(self._map, dtype=np.uint8)
        self._header = self.array[:_HEADER].view(np.int64)

    def header(self) -> np.ndarray:
        """The slot's header words: [0] the token of the step it holds (written after the data), [1 + w] the token
        of the step worker w has finished with (written by that worker)."""
        if self._header is None:
            self.ensure(_HEADER, pin=False)
        return self._header  # type: ignore[return-value]

    def done_words(self) -> list[int]:
        return self._header.tolist() if self._header is not None else [-1] * (_HEADER // 8)

    def close(self) -> None:
        """Unmap and delete the file (the worker keeps its own mapping of the inode until it lets go)."""
        if self.registered and self.array is not None:
            _host_unregister(self.array)
        self.registered = False
        self.array = self._header = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive somewhere: the mapping goes with it
                pass
            self._map = None
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _host_register(arr: np.ndarray) -> bool:
    try:
        err = torch.cuda.cudart().cudaHostRegister(arr.ctypes.data, arr.nbytes, 0)
        ok = int(err) == 0 if not hasattr(err, "value") else err.value == 0
        if not ok:
            log.warning("cudaHostRegister failed; shared-memory copies go through a pinned staging buffer",
                        error=str(err))
        return ok
    except Exception as exc:  # no CUDA, or a torch build without the binding
        log.warning("cudaHostRegister unavailable", error=repr(exc))
        return False


def _host_unregister(arr: np.ndarray) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(arr.ctypes.data)
    except Exception:
        pass


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class _Outbox:
    """Messages to the worker, in order, without ever blocking the caller.

    ``send`` pickles the message and writes it straight to the socket with ``MSG_DONTWAIT``: in the steady state
    that is the whole cost (tens of microseconds, no thread hand-over). Only when the socket buffer is full (the
    worker is behind) does the rest go to a queue that a sender thread writes with blocking sends; later messages
    queue behind it, so the order is kept. A worker that stops reading altogether (``limit_bytes`` queued) is
    treated as lost rather than letting the queue grow without bound."""

    def __init__(self, sock: socket.socket, on_lost: Callable[[str], None], limit_bytes: int = 64 << 20) -> None:
        self._sock, self._on_lost, self._limit = sock, on_lost, limit_bytes
        self._cond = threading.Condition(threading.Lock())
        self._pending: collections.deque[memoryview] = collections.deque()
        self._pending_bytes = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def send(self, msg: Any) -> bool:
        return self.send_frame(frame(msg))

    def send_frame(self, data: memoryview) -> bool:
        """Send an already framed message (``frame``): one pickling for several workers."""
        lost = None
        with self._cond:
            if self._closed:
                return False
            if not self._pending:
                try:
                    n = self._sock.send(data, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError as exc:
                    lost = f"send failed ({exc!r})"
                    n = -1
                if n == len(data):
                    return True
                if n >= 0:
                    data = data[n:]
            if lost is None and self._pending_bytes + len(data) > self._limit:
                lost = f"the worker stopped reading ({self._pending_bytes} bytes queued)"
            if lost is None:
                self._pending.append(data)
                self._pending_bytes += len(data)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._drain, name="dsa-otel-sender", daemon=True)
                    self._thread.start()
                self._cond.notify()
                return True
            self._closed = True
        self._on_lost(lost)
        return False

    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                data = self._pending[0]
            try:
                self._sock.sendall(data)
            except OSError as exc:
                with self._cond:
                    was_closed, self._closed = self._closed, True
                if not was_closed:
                    self._on_lost(f"send failed ({exc!r})")
                return
            with self._cond:
                self._pending.popleft()
                self._pending_bytes -= len(data)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


def frame(msg: Any) -> memoryview:
    """A message as multiprocessing.Connection frames it (length, then the pickle), what the worker reads."""
    payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return memoryview(struct.pack("!i", len(payload)) + payload)


class _LateCopies:
    """The fallback for a slot the driver would not page-lock: a thread waits for the DMA into a pinned staging
    buffer, copies it into the slot and writes the step's token (the model thread never waits on the GPU)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="dsa-otel-late-copies", daemon=True)
        self._thread.start()

    def put(self, event: Any, copies: list[tuple[np.ndarray, torch.Tensor]], header: np.ndarray, token: int) -> None:
        self._jobs.put((event, copies, header, token))

    def _run(self) -> None:
        while True:
            event, copies, header, token = self._jobs.get()
            try:
                event.synchronize()  # a blocking-sync event: only this thread sleeps, the GIL is released
                for dst, st in copies:
                    np.copyto(dst, st.numpy(), casting="unsafe")
                header[0] = token
            except Exception as exc:  # the worker then times out on this step and counts it failed
                log.error("could not copy a step into shared memory", error=repr(exc))


def owner_of(request_id: int | str, width: int, n_workers: int) -> int:
    """Which of ``n_workers`` worker processes owns a request. Integer ids go by shard (``id // width``, the JSONL
    file they land in), so every shard file has exactly one writer; other ids by a stable hash (their worker then
    numbers them inside shards it owns)."""
    if n_workers == 1:
        return 0
    if isinstance(request_id, (int, np.integer)) and not isinstance(request_id, bool):
        return (int(request_id) // width) % n_workers
    digest = hashlib.blake2b(str(request_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n_workers


class _WorkerLink:
    """One worker process: its socket (an outbox to it, a receiver thread for its answers) and its counters."""

    def __init__(self, index: int, on_lost: Callable[[int, str], None], on_message: Callable[[int, Any], None]
                 ) -> None:
        self.index = index
        self.stats: dict[str, Any] = {}
        self.alive = True
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.process = subprocess.Popen([sys.executable, "-m", "dsa_otel.worker", str(child_sock.fileno())],
                                        pass_fds=(child_sock.fileno(),), env=env, stdin=subprocess.DEVNULL)
        child_sock.close()
        self.sock = parent_sock
        self.outbox = _Outbox(parent_sock, lambda why: on_lost(index, why))
        self.rx = Connection(os.dup(parent_sock.fileno()))
        self._on_lost, self._on_message = on_lost, on_message
        self.receiver = threading.Thread(target=self._receive, name=f"dsa-otel-receiver-{index}", daemon=True)

    def start(self) -> None:
        self.receiver.start()

    def send(self, msg: Any) -> bool:
        return self.alive and self.outbox.send(msg)

    def send_frame(self, data: memoryview) -> bool:
        return self.alive and self.outbox.send_frame(data)

    def _receive(self) -> None:
        """Rare messages only: answers to flush / stop, the worker's counters (a few times a second), errors."""
        while True:
            try:
                msg = self.rx.recv()
            except (EOFError, OSError) as exc:
                self._on_lost(self.index, f"connection closed ({exc!r})")
                return
            self._on_message(self.index, msg)

    def close(self) -> None:
        self.outbox.close()
        for c in (self.rx, self.sock):
            try:
                c.close()
            except OSError:
                pass


class _Answers:
    """A request sent to every live worker (flush, stop): done when each has answered or is gone."""

    def __init__(self, waiting: set[int], done: threading.Event) -> None:
        self.waiting, self.done = waiting, done
        self.replies: dict[int, Any] = {}

    def answer(self, worker: int, reply: Any = None) -> None:
        if worker in self.waiting:
            self.waiting.discard(worker)
            self.replies[worker] = reply
        if not self.waiting:
            self.done.set()


class ProcessMaterializer:
    """The traced process's half of ``worker="process"``: the same ``submit`` / ``poll`` interface as
    ``Materializer``, but a step is handed over on the caller's thread, with no thread of this process woken.

    With ``worker_processes = n > 1`` every step goes to all n workers (one slot, read by each), and each turns
    only its own requests (``owner_of``) into spans; request lifecycle messages go to the owner alone. A slot is
    free again when every live worker has written the step's token into its done word."""

    def __init__(self, config: TraceConfig, kv_fetch_model: KVFetchModel | None, counters: Counters,
                 release_slot: Callable[[], None], release_buffer: Callable[..., None],
                 resource_attributes: dict[str, Any] | None = None) -> None:
        self.config = config
        self.counters = counters
        self.release_slot = release_slot
        self.release_buffer = release_buffer
        self.embed_payload = False  # decided in the worker
        self.alive = True
        self._stopping = False
        self._failed_here = 0
        self._lost_logged: set[int] = set()
        self._streams: dict[torch.device, Any] = {}
        self._staging: dict[tuple[torch.device, int, int], torch.Tensor] = {}
        self._late: _LateCopies | None = None
        tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        directory = config.shm_dir or _shm_dir()
        self._slots = [SharedSlot(directory, tag, i) for i in range(config.capture_slots)]
        self._free_slots: list[int] = list(range(config.capture_slots))
        self._in_flight: dict[int, int] = {}  # slot -> the token of the step it holds, until the workers are done
        self._slot_lock = threading.Lock()
        self._token_src: dict[torch.device, torch.Tensor] = {}  # per device, one int64 per slot: its next token
        self._step_token = 0  # tokens start at 1: a fresh slot's header reads 0
        self._waiters: dict[int, _Answers] = {}
        self._next_token = 0
        self._n = config.worker_processes
        self._width = config.max_requests_per_file
        worker_config = config.replace(worker="thread", worker_processes=1)
        self._links = [_WorkerLink(i, self._worker_lost, self._on_message) for i in range(self._n)]
        for link in self._links:
            link.send(("init", worker_config, kv_fetch_model, resource_attributes or {}, link.index, self._n))
            link.start()

    # ------------------------------------------------------------------ messages to the workers
    def submit(self, msg: tuple) -> None:
        """Hand a message over (never blocks; a step's data goes through its shared-memory slot)."""
        kind = msg[0]
        if kind == "step":
            try:
                self._ship_step(msg[1])
            except Exception as exc:  # tracing never takes the model down
                self._failed_here += 1
                if self._failed_here & (self._failed_here - 1) == 0:  # 1st, 2nd, 4th, ...: no log per step
                    log.exception("could not hand a step to the tracing worker; it is dropped", error=str(exc),
                                  steps_failed=self._failed_here)
        elif kind == "flush":
            self._request(("flush",), msg[1])
        elif kind == "stop":
            # shutdown waits on ``done`` with its own timeout: the bounded wait for the workers runs aside
            threading.Thread(target=self._stop, args=(msg[1],), name="dsa-otel-stop", daemon=True).start()
        else:  # request lifecycle: to the request's owner
            self._links[owner_of(msg[1], self._width, self._n)].send(msg)

    def _send_all(self, msg: Any) -> bool:
        """Send to every live worker (pickled once); True if at least one took it."""
        data = frame(msg)
        sent = False
        for link in self._links:
            sent = link.send_frame(data) or sent
        return sent

    def _worker_lost(self, index: int, why: str) -> None:
        link = self._links[index]
        if not link.alive:
            return
        link.alive = False
        link.outbox.close()
        if index not in self._lost_logged and not self._stopping:
            self._lost_logged.add(index)
            log.error("a tracing worker process is gone; its requests' further steps are lost", worker=index,
                      reason=why, returncode=link.process.poll())
        for answers in list(self._waiters.values()):
            answers.answer(index)
        if not any(l.alive for l in self._links):
            self.alive = False
        self.poll()  # slots the dead worker held no longer wait for it

    def _on_message(self, index: int, msg: Any) -> None:
        kind = msg[0]
        if kind == "stats":
            self._links[index].stats = msg[1]
        elif kind == "done":
            self._worker_done(msg[1], msg[2], index)
        elif kind in ("flushed", "stopped"):
            self._links[index].stats = msg[2]
            answers = self._waiters.get(msg[1])
            if answers is not None:
                answers.answer(index, msg[3] if len(msg) > 3 else None)
                if not answers.waiting:
                    self._waiters.pop(msg[1], None)
        elif kind == "fatal":
            log.error("tracing worker could not start", worker=index, error=msg[1])

    def _request(self, msg: tuple, done: threading.Event) -> _Answers:
        """Send a message every live worker answers (flush / stop); ``done`` is set once all have answered or
        died."""
        token = self._next_token
        self._next_token += 1
        answers = _Answers({l.index for l in self._links if l.alive}, done)
        self._waiters[token] = answers
        for link in self._links:
            if link.index in answers.waiting and not link.send(msg + (token,)):
                answers.answer(link.index)
        if not answers.waiting:
            done.set()
        return answers

    def _stop(self, done: threading.Event) -> None:
        self._stopping = True  # workers exiting from here on are not lost
        finished = threading.Event()
        answers = self._request(("stop", self.counters.steps_dropped), finished)
        finished.wait(STOP_TIMEOUT_S)
        for link in self._links:
            try:
                link.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("tracing worker did not exit; terminating it", worker=link.index)
                link.process.terminate()
        if self._n > 1:
            self._write_merged_summary([r for r in answers.replies.values() if r])
        self.alive = False
        for link in self._links:
            link.alive = False
            link.close()
        self.poll()
        for s in self._slots:
            s.close()
        done.set()

    def _write_merged_summary(self, parts: list[tuple[Any, dict[str, int]]]) -> None:
        """summary.json of a run written by several workers: their accumulators merged, their counters summed."""
        from .exporters.jsonl import atomic_write_json  # local import: the exporters package imports dsa_otel

        if not parts:
            return
        total = parts[0][0]
        extra: dict[str, int] = {}
        for acc, counters in parts:
            if acc is not total:
                total.merge(acc)
            for k, v in counters.items():
                extra[k] = extra.get(k, 0) + v
        tracing = self.stats()
        tracing.update(extra)
        try:
            atomic_write_json(os.path.join(self.config.run_dir, "summary.json"), total.to_json(tracing))
        except OSError as exc:
            log.error("could not write summary.json", error=repr(exc))

    # ------------------------------------------------------------------ slots coming back
    def poll(self) -> None:
        """Take back the slots whose step every live worker has finished: each writes the step's token into its
        done word of the slot. Called by ``end_step`` on the model thread: a few memory reads, no message, no
        thread woken."""
        if not self._in_flight:
            return
        back = 0
        live = [l.index for l in self._links if l.alive]
        with self._slot_lock:
            for slot_id, token in list(self._in_flight.items()):
                words = self._slots[slot_id].done_words()
                if not self.alive or all(words[1 + w] == token for w in live):
                    del self._in_flight[slot_id]
                    self._free_slots.append(slot_id)
                    back += 1
        for _ in range(back):
            self.release_slot()

    def _worker_done(self, slot_id: int, token: int, worker: int) -> None:
        """A worker said in a message that it is done with a step (it could not write its done word)."""
        self._slots[slot_id].header()[1 + worker] = token  # as if it had written it: poll decides
        self.poll()

    def _slot_done(self, slot_id: int, token: int) -> None:
        """Free a slot whose step never reached any worker."""
        with self._slot_lock:
            if self._in_flight.get(slot_id) != token:
                return
            del self._in_flight[slot_id]
            self._free_slots.append(slot_id)
        self.release_slot()

    # ------------------------------------------------------------------ steps
    def _stream(self, dev: torch.device) -> Any:
        return side_stream(self._streams, dev)

    def _give_back(self, cap: StepCapture) -> None:
        """Return the snapshot buffer and the ring slot of a step that is not handed over."""
        self.release_buffer(cap.buffer)
        cap.buffer = None
        self.release_slot()

    def _ship_step(self, cap: StepCapture) -> None:
        if not self.alive:
            self._failed_here += 1
            self._give_back(cap)
            return
        with self._slot_lock:
            slot_id = self._free_slots.pop()  # the tracer's semaphore guarantees one is free
        self._step_token += 1
        token = self._step_token
        try:
            regions = self._fill(cap, slot_id, token)
        except BaseException:
            with self._slot_lock:
                self._free_slots.append(slot_id)
            self._give_back(cap)
            raise
        with self._slot_lock:
            self._in_flight[slot_id] = token
        if not self._send_all(("step", self._meta(cap, slot_id, token, regions))):
            self._failed_here += 1
            self._slot_done(slot_id, token)
        elif not all(l.alive for l in self._links):  # a dead worker's share of this step is lost: count the step
            dead = {l.index for l in self._links if not l.alive}
            if any(owner_of(rid, self._width, self._n) in dead for g in cap.groups for rid in g.request_ids):
                self._failed_here += 1

    def _fill(self, cap: StepCapture, slot_id: int, token: int) -> dict[Any, tuple]:
        """Start moving the step's arrays into the slot, the token into its header last, and give the snapshot
        buffer back (on a GPU with the event after the copies that read it). Returns where each array sits."""
        slot = self._slots[slot_id]
        idx = cap.indices
        on_gpu = idx.is_cuda
        # what goes through the slot: on a GPU, the packed int32 region (selections and the groups' device
        # vectors) in one copy, else the selections; then the scores (float32)
        arrays: list[tuple[Any, torch.Tensor, np.dtype]] = []
        if cap.packed is not None:
            arrays.append(("packed", cap.packed, np.dtype(np.int32)))
        else:
            arrays.append(("pos", idx, np.dtype(np.int32)))
        if cap.scores is not None:
            arrays.append(("scores", cap.scores, np.dtype(np.float32)))
        regions: dict[Any, tuple[int, str, tuple[int, ...]]] = {}
        off = _HEADER
        for key, t, dt in arrays:
            regions[key] = (off, dt.str, tuple(t.shape))
            off += -(-(t.numel() * dt.itemsize) // 64) * 64
        buf = slot.ensure(off, pin=on_gpu)
        views = [buf[regions[key][0]: regions[key][0] + t.numel() * dt.itemsize].view(dt).reshape(t.shape)
                 for key, t, dt in arrays]
        if "packed" in regions:
            base = regions.pop("packed")[0]
            for key, (o, shape) in cap.packed_layout.items():
                regions[key] = (base + 4 * o, "<i4", shape)
        keep = cap.buffer
        cap.buffer = None
        if on_gpu:
            reads_done = self._gpu_to_slot(cap, slot, slot_id, token, list(zip(views, (t for _, t, _ in arrays))))
            # the snapshot buffer is free for reuse once the copies out of it have run (the next user's stream
            # waits for them on the GPU): device memory stays at a buffer or two however deep the ring is
            self.release_buffer(keep, reads_done)
            return regions
        np.copyto(views[0], idx.numpy(), casting="unsafe")  # CPU: copy now (numpy releases the GIL)
        if cap.scores is not None:
            np.copyto(views[1], cap.scores.float().numpy())
        slot.header()[0] = token
        self.release_buffer(keep)  # the snapshot is in the slot now
        return regions

    def _meta(self, cap: StepCapture, slot_id: int, token: int,
              regions: dict[Any, tuple[int, str, tuple[int, ...]]]) -> dict[str, Any]:
        groups = []
        for gi, g in enumerate(cap.groups):
            groups.append((list(g.request_ids),) + tuple(
                ("@slot",) + regions[(gi, name)] if (gi, name) in regions else _plain(getattr(g, name))
                for name in ("seq_lens", "block_table", "steps")))
        return {
            "slot": slot_id, "path": self._slots[slot_id].path,
            "regions": {k: v for k, v in regions.items() if isinstance(k, str)},
            "t_start_ns": cap.t_start_ns, "t_end_ns": cap.t_end_ns,
            "layer_ids": cap.layer_ids, "batch_sizes": cap.batch_sizes, "record_group": cap.record_group,
            "groups": groups, "kv_reports": cap.kv_reports, "phase": cap.phase, "dropped": self.counters.steps_dropped,
            "token": token,
        }

    def _gpu_to_slot(self, cap: StepCapture, slot: SharedSlot, slot_id: int, token: int,
                     copies: list[tuple[np.ndarray, torch.Tensor]]) -> Any:
        """DMA the step's tensors into the slot on a side stream, after the snapshot's event, then the step's token
        into the slot's header; nothing here waits for the GPU (the worker waits for the token; the DMAs of one
        stream complete in order). Tensors that are not in a ring buffer get ``record_stream``. Returns a CUDA
        event after the last copy out of the snapshot buffer."""
        stream = self._stream(cap.indices.device)
        header = slot.header()
        with torch.cuda.stream(stream):
            stream.wait_event(cap.event)
            if slot.registered:
                for dst, src in copies:
                    torch.from_numpy(dst).copy_(src, non_blocking=True)
                    if src is not cap.packed:  # the ring buffer is released with an event; others are not
                        src.record_stream(stream)  # their owner may free them: the allocator waits for this copy
                reads_done = torch.cuda.Event()
                reads_done.record(stream)
                src_token = self._token_source(cap.indices.device)[slot_id:slot_id + 1]
                src_token.fill_(token)
                torch.from_numpy(header[:1]).copy_(src_token, non_blocking=True)
                return reads_done
            staged = []  # page-locked staging, then a host copy by the late-copy thread
            for i, (dst, src) in enumerate(copies):
                st = self._stage_buffer(src, slot_id, i)
                st.copy_(src, non_blocking=True)
                staged.append((dst, st))
            done = torch.cuda.Event(blocking=True)
            done.record(stream)
        if self._late is None:
            self._late = _LateCopies()
        self._late.put(done, staged, header, token)
        return done

    def _token_source(self, dev: torch.device) -> torch.Tensor:
        t = self._token_src.get(dev)
        if t is None:
            t = self._token_src[dev] = torch.zeros(len(self._slots), dtype=torch.int64, device=dev)
        return t

    def _stage_buffer(self, like: torch.Tensor, slot_id: int, i: int) -> torch.Tensor:
        key = (like.device, slot_id, i)  # per slot: a slot's staging is reused only after the worker is done
        nbytes = like.numel() * like.element_size()
        buf = self._staging.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._staging[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
        return buf[:nbytes].view(like.dtype).view(like.shape)

    # ------------------------------------------------------------------ counters
    def stats(self) -> dict[str, Any]:
        """The workers' counters merged with this process's (drops are decided here). With several workers a step
        counts as captured when every worker captured its share (the minimum), rows and spans add up."""
        parts = [l.stats for l in self._links if l.stats]
        out: dict[str, Any] = {}
        for st in parts:
            for k, v in st.items():
                if k == "pid" or not isinstance(v, (int, float)):
                    continue
                if k == "steps_captured":
                    out[k] = min(out.get(k, v), v)
                elif k == "steps_failed":
                    out[k] = max(out.get(k, 0), v)
                else:
                    out[k] = out.get(k, 0) + v
        out["steps_dropped"] = self.counters.steps_dropped
        out["steps_failed"] = int(out.get("steps_failed", 0)) + self._failed_here
        out["worker_pid"] = self._links[0].process.pid
        out["worker_pids"] = [l.process.pid for l in self._links]
        out["worker_alive"] = int(all(l.alive and l.process.poll() is None for l in self._links))
        return out


def _plain(x: Any) -> Any:
    """A host value for the wire (CPU tensors become numpy; device tensors were moved before)."""
    if isinstance(x, torch.Tensor):
        return x.detach().numpy()
    return x


# ---------------------------------------------------------------------- the worker process
def _attach(maps: dict[int, tuple[str, mmap.mmap]], slot: int, path: str) -> mmap.mmap:
    got = maps.get(slot)
    if got is not None and got[0] == path:
        return got[1]
    if got is not None:
        _close_map(got[1])
    fd = os.open(path, os.O_RDWR)  # read-write: the worker writes the slot's done word
    try:
        m = mmap.mmap(fd, 0)
    finally:
        os.close(fd)
    maps[slot] = (path, m)
    return m


def _close_map(m: mmap.mmap) -> None:
    try:
        m.close()
    except BufferError:  # still viewed by a step in flight; the mapping is freed with it
        pass


def _capture_from_meta(meta: dict[str, Any], m: mmap.mmap) -> StepCapture:
    def region(off: int, dt: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.frombuffer(m, dtype=np.dtype(dt), count=int(np.prod(shape)), offset=off).reshape(shape)

    def value(v: Any) -> Any:  # per-request vectors: copied out of the slot as int64, like a host caller's
        return region(*v[1:]).astype(np.int64) if isinstance(v, tuple) and v and v[0] == "@slot" else v

    regions = meta["regions"]
    scores = torch.from_numpy(region(*regions["scores"])) if "scores" in regions else None
    groups = [BatchGroup(request_ids=rids, seq_lens=value(sl), block_table=value(bt), steps=value(st))
              for rids, sl, bt, st in meta["groups"]]
    return StepCapture(t_start_ns=meta["t_start_ns"], t_end_ns=meta["t_end_ns"], layer_ids=meta["layer_ids"],
                       batch_sizes=meta["batch_sizes"], record_group=meta["record_group"], groups=groups,
                       indices=torch.from_numpy(region(*regions["pos"])), scores=scores,
                       kv_reports=meta["kv_reports"], phase=meta["phase"], buffer=(meta["slot"], meta["token"], m))


def _wait_ready(m: mmap.mmap, token: int, timeout_s: float = READY_TIMEOUT_S) -> bool:
    """Wait until the slot's header holds ``token``: the traced process's DMAs of this step have landed (they
    complete in stream order, the token last). Polls with a short, growing sleep; this process has no GPU."""
    flag = np.frombuffer(m, dtype=np.int64, count=1, offset=0)
    deadline = time.monotonic() + timeout_s
    pause = 50e-6
    while int(flag[0]) != token:
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)
    return True


def _restrict(cap: StepCapture, mine: Callable[[Any], bool]) -> StepCapture | None:
    """The part of a step that belongs to this worker's requests (None when nothing does): its rows of the
    selections, its batch positions of each group's vectors, its requests' KV reports."""
    keep = [np.array([b for b, rid in enumerate(g.request_ids) if mine(rid)], dtype=np.int64) for g in cap.groups]
    if not any(k.size for k in keep):
        return None
    if all(k.size == len(g.request_ids) for k, g in zip(keep, cap.groups)):
        return cap
    new_group = np.cumsum([k.size > 0 for k in keep]) - 1
    starts = np.concatenate(([0], np.cumsum(cap.batch_sizes)[:-1]))
    # a record covers the first batch_sizes[i] positions of its group (all of them, normally)
    rec_pos = [keep[g][keep[g] < n] for g, n in zip(cap.record_group, cap.batch_sizes)]
    rec_keep = [i for i, k in enumerate(rec_pos) if k.size]
    rows = np.concatenate([starts[i] + rec_pos[i] for i in rec_keep])

    def take(v: Any, k: np.ndarray, n: int) -> Any:
        if v is None or np.ndim(v) == 0:
            return v
        arr = v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        return arr[k] if arr.shape[0] == n else arr

    groups = [BatchGroup(request_ids=[g.request_ids[b] for b in k], seq_lens=take(g.seq_lens, k, len(g.request_ids)),
                         block_table=take(g.block_table, k, len(g.request_ids)),
                         steps=take(g.steps, k, len(g.request_ids))) for g, k in zip(cap.groups, keep) if k.size]
    reports = []
    for rep in cap.kv_reports:
        sel = [b for b, rid in enumerate(rep.request_ids) if mine(rid)]
        if sel:
            reports.append(KVReport(rep.layer_id, [rep.request_ids[b] for b in sel], rep.tier,
                                    {f: v[sel] for f, v in rep.values.items()}))
    return StepCapture(
        t_start_ns=cap.t_start_ns, t_end_ns=cap.t_end_ns, layer_ids=cap.layer_ids[rec_keep],
        batch_sizes=np.array([rec_pos[i].size for i in rec_keep], dtype=np.int64),
        record_group=new_group[cap.record_group[rec_keep]], groups=groups,
        indices=torch.from_numpy(cap.indices.numpy()[rows]),  # numpy: no torch CPU kernel, no thread pool
        scores=torch.from_numpy(cap.scores.numpy()[rows]) if cap.scores is not None else None,
        kv_reports=reports, phase=cap.phase,
        buffer=cap.buffer, step_requests=len({rid for g in cap.groups for rid in g.request_ids}))


def worker_main(fd: int) -> int:
    """Entry point of ``python -m dsa_otel.worker <fd>``: serve one traced process over the socket ``fd``."""
    from .exporters.jsonl import ShardedJsonlExporter  # local imports: the exporters package imports dsa_otel

    from .tracer import DSATracer

    # this process runs numpy and Python, never torch kernels on purpose: one torch thread, so that a stray CPU op
    # cannot start a pool of spinning threads in each of several workers (it did: ~100 ms of CPU per step)
    torch.set_num_threads(1)
    conn = Connection(socket.socket(fileno=fd).detach())
    send_lock = threading.Lock()

    def send(msg: Any) -> None:
        try:
            with send_lock:
                conn.send(msg)
        except (OSError, EOFError, ValueError):
            pass  # the traced process is gone; finish what we have

    try:
        _, config, kv_model, resource_attributes, index, n_workers = conn.recv()
        tracer = DSATracer(config, kv_fetch_model=kv_model, resource_attributes=resource_attributes)
    except Exception as exc:
        send(("fatal", repr(exc)))
        raise
    mat = tracer.materializer
    mat.release_slot = lambda: None
    width = config.max_requests_per_file
    jsonl = [p.exporter for p in tracer.processors if isinstance(p.exporter, ShardedJsonlExporter)]
    if n_workers > 1:  # one of several: own every n-th shard; the traced process writes the merged summary
        mat.owns_int_id = lambda int_id: (int_id // width) % n_workers == index
        for exp in jsonl:
            exp.summary_file = None

    def mine(rid: Any) -> bool:
        return owner_of(rid, width, n_workers) == index

    last_stats = [0.0]

    def stats_now(force: bool = False) -> None:
        """The counters go to the traced process at most every 0.2 s (and with the flush / stop answers)."""
        now = time.monotonic()
        if force or now - last_stats[0] >= 0.2:
            last_stats[0] = now
            send(("stats", tracer.tracing_stats()))

    def done(held: Any) -> None:
        """Give the slot back: the step's token goes into this worker's done word of the slot, which the traced
        process reads when it next ends a step (no message, so none of its threads wakes up)."""
        if held is None:
            return
        slot, token, m = held
        try:
            np.frombuffer(m, dtype=np.int64, count=1, offset=8 * (1 + index))[0] = token
        except (ValueError, TypeError):  # the mapping is gone (cannot happen while the slot is in flight)
            send(("done", slot, token))
        stats_now()

    mat.release_buffer = done
    maps: dict[int, tuple[str, mmap.mmap]] = {}
    orphaned = False
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            log.warning("the traced process went away; closing the trace files with what was received")
            orphaned = True
            if n_workers > 1:  # nobody will merge: keep this worker's share of the summary
                for exp in jsonl:
                    exp.summary_file = f"summary.worker{index}.json"
            tracer.shutdown()
            break
        kind = msg[0]
        if kind == "step":
            meta = msg[1]
            tracer.counters.steps_dropped = meta["dropped"]
            try:
                m = _attach(maps, meta["slot"], meta["path"])
                if not _wait_ready(m, meta["token"]):
                    raise TimeoutError(f"step data did not arrive in {READY_TIMEOUT_S:.0f} s")
                cap = _capture_from_meta(meta, m)
                part = cap if n_workers == 1 else _restrict(cap, mine)
            except Exception as exc:
                log.error("could not read a step from shared memory", error=repr(exc))
                tracer.counters.steps_failed += 1
                send(("done", meta["slot"], meta["token"]))
                stats_now(force=True)
                continue
            if part is None:  # none of this worker's requests in the step: its share is complete
                tracer.counters.steps_captured += 1
                done(cap.buffer)
                continue
            mat.queue.put(("step", part))
        elif kind == "flush":
            ok = tracer.flush()
            send(("flushed", msg[1], tracer.tracing_stats(), ok))
        elif kind == "stop":
            tracer.counters.steps_dropped = msg[1]
            tracer.shutdown()
            parts = None
            if n_workers > 1:
                parts = [(exp.summary, exp.summary_counters()) for exp in jsonl] or None
            send(("stopped", msg[2], tracer.tracing_stats(), parts[0] if parts else None))
            break
        else:
            mat.queue.put(msg)
    for path, m in maps.values():
        _close_map(m)
        if orphaned:  # the traced process owns the slot files; when it is gone nobody else will remove them
            try:  # (with several workers, one still reading its backlog then loses the steps not yet mapped)
                os.unlink(path)
            except FileNotFoundError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(int(sys.argv[1])))
