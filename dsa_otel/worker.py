"""Tracing in a worker process (``TraceConfig.worker = "process"``).

Why: the statistics, span building and export of a traced step are Python and numpy work. In a background
*thread* they share the traced process's GIL with the model thread, whose every kernel launch needs it; on a GPU
a few milliseconds of tracing work per step then stretch the step itself (measured in docs/performance.md). Here
that work runs in a separate interpreter and the traced process keeps only what cannot move:

model thread   record_topk / end_step exactly as with the thread worker (one ``torch.cat``, an event, a queue put)
shipper thread (traced process) per step: on a side stream, after the snapshot's event, copy the selections
               and the per-request vectors (seq_lens, block tables) straight into a shared-memory slot
               (page-locked with ``cudaHostRegister``, so each copy is one DMA), then copy the step's token into
               the slot's first 8 bytes; send a small message (request ids, record layout, where each array sits
               in the slot, the token) over a socket at once, without waiting for the GPU. The worker waits until
               the token appears in the slot (the DMAs of one stream complete in order, so the data is there
               before it). The shipper thus never wakes when the GPU finishes a step, the moment the model thread
               wakes too and needs the GIL. On the CPU numpy copies the snapshot into the slot (GIL released).
               The worker sorts (numpy's SIMD sort): every launch left here competes for the GIL.
receiver thread (traced process) gives a slot (and its snapshot buffer) back when the worker says it is done,
               and keeps its counters.
worker process ``python -m dsa_otel.worker``: an ordinary thread-mode pipeline (Materializer, span processors,
               exporters, summary.json) fed from the socket, so records are identical to thread mode.

Failure handling: if the worker dies, the traced process logs it once, counts the steps it can no longer hand over
as failed and carries on; a crash of the traced process ends the worker's input, and the worker then finishes
and closes what it already has (its shards stay valid). The number of steps in flight is bounded by
``ring_slots`` in both processes, so a slow disk makes steps drop (counted), never block the model.
"""

from __future__ import annotations

import mmap
import os
import queue
import secrets
import socket
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

from .capture import BatchGroup, StepCapture
from .config import TraceConfig
from .kvfetch import KVFetchModel
from .materializer import Counters, side_stream

log = structlog.get_logger("dsa_otel.worker")

_ALIGN = 4096
_HEADER = 64  # a slot starts with the int64 token of the step it holds, written last
READY_TIMEOUT_S = 60.0  # how long the worker waits for a step's data to land in its slot
STOP_TIMEOUT_S = 60.0  # how long shutdown waits for the worker to flush and close its files


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
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size
        self.array = np.frombuffer(self._map, dtype=np.uint8)

    def close(self) -> None:
        """Unmap and delete the file (the worker keeps its own mapping of the inode until it lets go)."""
        if self.registered and self.array is not None:
            _host_unregister(self.array)
        self.registered = False
        self.array = None
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


class ProcessMaterializer:
    """The traced process's half of ``worker="process"``: same ``queue`` protocol as ``Materializer``."""

    def __init__(self, config: TraceConfig, kv_fetch_model: KVFetchModel | None, counters: Counters,
                 release_slot: Callable[[], None], release_buffer: Callable[[Any], None],
                 resource_attributes: dict[str, Any] | None = None) -> None:
        self.config = config
        self.counters = counters
        self.release_slot = release_slot
        self.release_buffer = release_buffer
        self.embed_payload = False  # decided in the worker
        self.worker_stats: dict[str, Any] = {}
        self.alive = True
        self._stopping = False
        self._failed_here = 0
        self._lost_logged = False
        self._streams: dict[torch.device, Any] = {}
        self._staging: dict[tuple[torch.device, int], torch.Tensor] = {}
        tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        directory = _shm_dir()
        self._slots = [SharedSlot(directory, tag, i) for i in range(config.ring_slots)]
        self._free_slots: list[int] = list(range(config.ring_slots))
        self._slot_lock = threading.Lock()
        self._held: dict[int, Any] = {}  # slot -> snapshot buffer its DMAs read, released when the worker is done
        self._token_src: dict[torch.device, torch.Tensor] = {}  # per device, one int64 per slot: its next token
        self._step_token = 0
        self._waiters: dict[int, threading.Event] = {}
        self._next_token = 0
        self._send_lock = threading.Lock()

        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.process = subprocess.Popen([sys.executable, "-m", "dsa_otel.worker", str(child_sock.fileno())],
                                        pass_fds=(child_sock.fileno(),), env=env, stdin=subprocess.DEVNULL)
        child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self._send(("init", config.replace(worker="thread"), kv_fetch_model, resource_attributes or {}))
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self._receiver = threading.Thread(target=self._receive, name="dsa-otel-receiver", daemon=True)
        self._receiver.start()
        self.thread = threading.Thread(target=self._run, name="dsa-otel-shipper", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ messages to the worker
    def _send(self, msg: Any) -> bool:
        if not self.alive:
            return False
        try:
            with self._send_lock:
                self.conn.send(msg)
            return True
        except (OSError, EOFError, ValueError) as exc:
            self._worker_lost(repr(exc))
            return False

    def _worker_lost(self, why: str) -> None:
        self.alive = False
        if not self._lost_logged:
            self._lost_logged = True
            log.error("the tracing worker process is gone; further steps are counted as failed", reason=why,
                      returncode=self.process.poll())
        for ev in list(self._waiters.values()):
            ev.set()
        with self._slot_lock:  # the worker will never give its slots back
            lost = [i for i in range(len(self._slots)) if i not in self._free_slots]
            self._free_slots.extend(lost)
            held = [self._held.pop(i) for i in list(self._held)]
        for buf in held:
            self.release_buffer(buf)
        for _ in lost:
            self.release_slot()

    def _run(self) -> None:
        while True:
            msg = self.queue.get()
            kind = msg[0]
            try:
                if kind == "step":
                    self._ship_step(msg[1])
                elif kind == "flush":
                    self._request(("flush",), msg[1])
                elif kind == "stop":
                    self._stop(msg[1])
                    return
                else:
                    self._send(msg)
            except Exception as exc:  # tracing never takes the model down
                log.exception("tracing shipper failed on a message", kind=kind, error=repr(exc))
                if kind == "step":
                    self._failed_here += 1
                    self.release_buffer(msg[1].buffer)
                    msg[1].buffer = None

    def _request(self, msg: tuple, done: threading.Event) -> None:
        """Send a message the worker answers (flush); ``done`` is set on the answer or when the worker dies."""
        token = self._next_token
        self._next_token += 1
        self._waiters[token] = done
        if not self._send(msg + (token,)):
            self._waiters.pop(token, None)
            done.set()

    def _stop(self, done: threading.Event) -> None:
        self._stopping = True
        finished = threading.Event()
        self._request(("stop", self.counters.steps_dropped), finished)
        finished.wait(STOP_TIMEOUT_S)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("tracing worker did not exit; terminating it")
            self.process.terminate()
        self.alive = False
        try:
            self.conn.close()
        except OSError:
            pass
        for s in self._slots:
            s.close()
        done.set()

    # ------------------------------------------------------------------ steps
    def _stream(self, dev: torch.device) -> Any:
        return side_stream(self._streams, dev)

    def _give_back(self, cap: StepCapture) -> None:
        self.release_buffer(cap.buffer)
        cap.buffer = None
        self.release_slot()

    def _ship_step(self, cap: StepCapture) -> None:
        if not self.alive:
            self._failed_here += 1
            self._give_back(cap)
            return
        with self._slot_lock:
            slot_id = self._free_slots.pop()
        try:
            sent = self._fill_and_send(cap, slot_id)
        except BaseException:
            self._return_slot(slot_id)
            raise
        if not sent:
            self._failed_here += 1
            self._return_slot(slot_id)

    def _return_slot(self, slot_id: int) -> None:
        """Give a slot back that the worker never received (each slot is released exactly once)."""
        with self._slot_lock:
            if slot_id in self._free_slots:  # the worker-lost path already returned it
                return
            self._free_slots.append(slot_id)
            held = self._held.pop(slot_id, None)
        self.release_buffer(held)
        self.release_slot()

    def _fill_and_send(self, cap: StepCapture, slot_id: int) -> bool:
        slot = self._slots[slot_id]
        idx = cap.indices
        on_gpu = idx.is_cuda
        # what goes through the slot: the selections (int32), the scores (float32), and on the GPU the
        # per-request vectors (seq_lens, block tables, steps), so that nothing but a small message is pickled
        arrays: list[tuple[Any, torch.Tensor, np.dtype]] = [("pos", idx, np.dtype(np.int32))]
        if cap.scores is not None:
            arrays.append(("scores", cap.scores, np.dtype(np.float32)))
        if on_gpu:
            for gi, g in enumerate(cap.groups):
                for name in ("seq_lens", "block_table", "steps"):
                    v = getattr(g, name)
                    if isinstance(v, torch.Tensor) and v.is_cuda:
                        arrays.append(((gi, name), v, np.dtype(np.int64)))
        regions: dict[Any, tuple[int, str, tuple[int, ...]]] = {}
        off = _HEADER
        token = self._step_token
        self._step_token += 1
        for key, t, dt in arrays:
            regions[key] = (off, dt.str, tuple(t.shape))
            off += -(-(t.numel() * dt.itemsize) // 64) * 64
        buf = slot.ensure(off, pin=on_gpu)
        views = {key: buf[o: o + int(np.prod(shape)) * np.dtype(dt).itemsize].view(dt).reshape(shape)
                 for key, (o, dt, shape) in regions.items()}
        flag = buf[:8].view(np.int64)
        if on_gpu and self._gpu_to_slot(cap, slot, slot_id, token, flag, [(views[key], t) for key, t, _ in arrays]):
            with self._slot_lock:  # the DMAs may still be reading the snapshot: keep it until the worker is done
                self._held[slot_id] = cap.buffer
        else:
            if not on_gpu:  # numpy releases the GIL for these copies
                np.copyto(views["pos"], idx.numpy(), casting="unsafe")
                if cap.scores is not None:
                    np.copyto(views["scores"], cap.scores.float().numpy())
                flag[0] = token
            self.release_buffer(cap.buffer)  # the snapshot is in the slot now
        cap.buffer = None
        groups = []
        for gi, g in enumerate(cap.groups):
            groups.append((list(g.request_ids),) + tuple(
                ("@slot",) + regions[(gi, name)] if (gi, name) in regions else _plain(getattr(g, name))
                for name in ("seq_lens", "block_table", "steps")))
        meta = {
            "slot": slot_id, "path": slot.path, "regions": {k: v for k, v in regions.items() if isinstance(k, str)},
            "t_start_ns": cap.t_start_ns, "t_end_ns": cap.t_end_ns,
            "layer_ids": cap.layer_ids, "batch_sizes": cap.batch_sizes, "record_group": cap.record_group,
            "groups": groups, "kv_reports": cap.kv_reports, "phase": cap.phase, "dropped": self.counters.steps_dropped,
            "token": token,
        }
        return self._send(("step", meta))

    def _gpu_to_slot(self, cap: StepCapture, slot: SharedSlot, slot_id: int, token: int, flag: np.ndarray,
                     copies: list[tuple[np.ndarray, torch.Tensor]]) -> bool:
        """DMA the step's tensors into the slot on a side stream, after the snapshot's event, then the step's token
        into the slot's header; nothing here waits for the GPU (sorting is left to the worker: fewer launches here,
        where every Python call competes with the model thread for the GIL). Returns True if the copies are still
        in flight (the worker waits for the token), False if they are complete (the page-locked staging fallback,
        used when the slot could not be registered, waits on a blocking event and copies on the host)."""
        stream = self._stream(cap.indices.device)
        staged = []
        with torch.cuda.stream(stream):
            stream.wait_event(cap.event)
            for dst, src in copies:
                if slot.registered:
                    torch.from_numpy(dst).copy_(src, non_blocking=True)
                    src.record_stream(stream)  # the caller may free it: the allocator waits for this copy
                else:  # page-locked staging, then a host copy below
                    st = self._stage_buffer(src, len(staged))
                    st.copy_(src, non_blocking=True)
                    staged.append((dst, st))
            if slot.registered:
                src_token = self._token_source(cap.indices.device)[slot_id:slot_id + 1]
                src_token.fill_(token)
                torch.from_numpy(flag).copy_(src_token, non_blocking=True)
                return True
            done = torch.cuda.Event(blocking=True)
            done.record(stream)
        done.synchronize()  # releases the GIL; only this thread waits
        for dst, st in staged:
            np.copyto(dst, st.numpy(), casting="unsafe")
        flag[0] = token
        return False

    def _token_source(self, dev: torch.device) -> torch.Tensor:
        t = self._token_src.get(dev)
        if t is None:
            t = self._token_src[dev] = torch.zeros(len(self._slots), dtype=torch.int64, device=dev)
        return t

    def _stage_buffer(self, like: torch.Tensor, i: int) -> torch.Tensor:
        key = (like.device, i)
        nbytes = like.numel() * like.element_size()
        buf = self._staging.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._staging[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
        return buf[:nbytes].view(like.dtype).view(like.shape)

    # ------------------------------------------------------------------ messages from the worker
    def _receive(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError) as exc:
                if self.alive and not self._stopping:
                    self._worker_lost(f"connection closed ({exc!r})")
                return
            kind = msg[0]
            if kind == "done":
                if msg[2] is not None:
                    self.worker_stats = msg[2]
                with self._slot_lock:
                    self._free_slots.append(msg[1])
                    held = self._held.pop(msg[1], None)
                self.release_buffer(held)
                self.release_slot()
            elif kind in ("flushed", "stopped"):
                self.worker_stats = msg[2]
                ev = self._waiters.pop(msg[1], None)
                if ev is not None:
                    ev.set()
            elif kind == "fatal":
                log.error("tracing worker could not start", error=msg[1])

    def stats(self) -> dict[str, Any]:
        """The worker's counters merged with this process's (drops are decided here)."""
        out = dict(self.worker_stats)
        out["steps_dropped"] = self.counters.steps_dropped
        out["steps_failed"] = int(out.get("steps_failed", 0)) + self._failed_here
        out["worker_pid"] = self.process.pid
        out["worker_alive"] = int(self.alive and self.process.poll() is None)
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
    fd = os.open(path, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
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

    def value(v: Any) -> Any:
        return region(*v[1:]) if isinstance(v, tuple) and v and v[0] == "@slot" else v

    regions = meta["regions"]
    scores = torch.from_numpy(region(*regions["scores"])) if "scores" in regions else None
    groups = [BatchGroup(request_ids=rids, seq_lens=value(sl), block_table=value(bt), steps=value(st))
              for rids, sl, bt, st in meta["groups"]]
    return StepCapture(t_start_ns=meta["t_start_ns"], t_end_ns=meta["t_end_ns"], layer_ids=meta["layer_ids"],
                       batch_sizes=meta["batch_sizes"], record_group=meta["record_group"], groups=groups,
                       indices=torch.from_numpy(region(*regions["pos"])), scores=scores,
                       kv_reports=meta["kv_reports"], phase=meta["phase"], buffer=meta["slot"])


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


def worker_main(fd: int) -> int:
    """Entry point of ``python -m dsa_otel.worker <fd>``: serve one traced process over the socket ``fd``."""
    import warnings

    warnings.filterwarnings("ignore", message=".*non-writable.*")  # read-only shared views are only read
    from .tracer import DSATracer

    conn = Connection(socket.socket(fileno=fd).detach())
    send_lock = threading.Lock()

    def send(msg: Any) -> None:
        try:
            with send_lock:
                conn.send(msg)
        except (OSError, EOFError, ValueError):
            pass  # the traced process is gone; finish what we have

    try:
        _, config, kv_model, resource_attributes = conn.recv()
        tracer = DSATracer(config, kv_fetch_model=kv_model, resource_attributes=resource_attributes)
    except Exception as exc:
        send(("fatal", repr(exc)))
        raise
    mat = tracer.materializer
    mat.release_slot = lambda: None
    last_stats = [0.0]

    def done(slot: Any) -> None:
        """Give the slot back; the counters ride along at most every 0.2 s (and on flush / stop)."""
        if slot is None:
            return
        now = time.monotonic()
        stats = None
        if now - last_stats[0] >= 0.2:
            last_stats[0] = now
            stats = tracer.tracing_stats()
        send(("done", slot, stats))

    mat.release_buffer = done
    maps: dict[int, tuple[str, mmap.mmap]] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            log.warning("the traced process went away; closing the trace files with what was received")
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
            except Exception as exc:
                log.error("could not read a step from shared memory", error=repr(exc))
                tracer.counters.steps_failed += 1
                send(("done", meta["slot"], tracer.tracing_stats()))
                continue
            mat.queue.put(("step", cap))
        elif kind == "flush":
            ok = tracer.flush()
            send(("flushed", msg[1], tracer.tracing_stats(), ok))
        elif kind == "stop":
            tracer.counters.steps_dropped = msg[1]
            tracer.shutdown()
            send(("stopped", msg[2], tracer.tracing_stats()))
            break
        else:
            mat.queue.put(msg)
    for path, m in maps.values():
        _close_map(m)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(int(sys.argv[1])))
