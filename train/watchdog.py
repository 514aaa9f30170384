"""Peer watchdog: a rank that stops answering ends the job, whether or not a collective returns.

Every rank runs a daemon thread that bumps its heartbeat in the launcher's key-value store
(torchrun's agent store, which lives outside the workers) every `interval` seconds and when
the trainer begins a step (`beat(step)`, at most 20 times a second), and watches ONE peer: the next rank in a ring,
so each rank is watched by exactly one other and a silent rank is reported once, with O(1)
store traffic per rank. A peer whose heartbeat has not moved for train.dist_timeout_s (a
SIGSTOPped or frozen process or node) is reported by its watcher: one message naming the
silent rank, its last step and the watcher's step goes to stderr and into torchrun's error
file (so it is the root cause torchrun prints last); a silent process on this host is then
SIGKILLed (a stopped process does not act on the agent's SIGTERM until its 30 s grace ends),
and the watcher exits at once with os._exit (its main thread may be blocked in a collective).

A rank that leaves, normally or with its own error, marks itself done and is not reported.
Collectives wait COLLECTIVE_GRACE_S longer than the watchdog, so a silent peer is named by
the watchdog rather than by a bare backend timeout; a peer that is alive but stuck (its
heartbeat still moves) ends the job through the collective timeout.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time

COLLECTIVE_GRACE_S = 5.0


class PeerStopped(RuntimeError):
    """A peer rank's heartbeat stopped for longer than train.dist_timeout_s."""


def step_text(step: int) -> str:
    return f"step {step}" if step > 0 else "start-up (before step 1)"


class Watchdog:
    def __init__(self, store, rank: int, world: int, timeout_s: float):
        self.store, self.rank, self.world, self.timeout_s = store, rank, world, timeout_s
        self.interval = min(1.0, timeout_s / 10)
        self.step = 0
        self.peer = (rank + 1) % world
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="longctx-watchdog", daemon=True)

    @classmethod
    def connect(cls, rank: int, world: int, timeout_s: float) -> Watchdog:
        """A watchdog on its own client of the store at MASTER_ADDR:MASTER_PORT (torchrun's
        agent store, or rank 0's under other env:// launchers), keys scoped to this restart."""
        import torch.distributed as dist

        client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                               timeout=datetime.timedelta(seconds=max(timeout_s / 2, 1.0)))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return cls(dist.PrefixStore(f"longctx/watchdog/attempt_{attempt}", client), rank, world, timeout_s)

    def start(self) -> Watchdog:
        self.store.set(f"who/{self.rank}", f"{socket.gethostname()} {os.getpid()}")
        self._publish(0)
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        self.step = step
        self._wake.set()

    def leave(self) -> None:
        """Tell the watcher this rank is gone on purpose, and end the thread (joined, so that
        its store client is not torn down under it at exit)."""
        self._stop.set()
        self._wake.set()
        try:
            self.store.set(f"done/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - leaving: the store may be gone with the job
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.timeout_s)

    def silent_ranks(self) -> list[int]:
        """Ranks whose heartbeat did not move for three intervals (every rank is read, twice):
        used on a collective's failure path to name who stopped answering."""
        time.sleep(3 * self.interval)
        first = self._read_all()
        time.sleep(3 * self.interval)
        second = self._read_all()
        return [r for r in first if first[r] is not None and first[r] == second[r]]

    def _read_all(self) -> dict[int, str | None]:
        beats = {}
        for r in range(self.world):
            if r != self.rank and not self.store.check([f"done/{r}"]):
                beats[r] = self.store.get(f"beat/{r}").decode() if self.store.check([f"beat/{r}"]) else None
        return beats

    def _publish(self, count: int) -> None:
        self.store.set(f"beat/{self.rank}", f"{count} {self.step}")

    def _run(self) -> None:
        count, seen, changed_at, store_ok_at = 0, None, time.monotonic(), time.monotonic()
        while not self._stop.wait(0.05):
            self._wake.wait(self.interval)
            self._wake.clear()
            now = time.monotonic()
            try:
                count += 1
                self._publish(count)
                if self.store.check([f"done/{self.peer}"]):
                    return
                started = self.store.check([f"beat/{self.peer}"])  # the peer may still be starting its watchdog
                beat = self.store.get(f"beat/{self.peer}").decode() if started else "0 0"
                store_ok_at = now
            except Exception as e:  # noqa: BLE001 - an unreachable store is a silent job too
                if now - store_ok_at > self.timeout_s and not self._stop.is_set():
                    self._report(f"the job's key-value store at {os.environ.get('MASTER_ADDR')}:"
                                 f"{os.environ.get('MASTER_PORT')} stopped answering ({e}); rank {self.rank} is at "
                                 f"{step_text(self.step)}")
                continue
            if beat != seen:
                seen, changed_at = beat, now
            elif now - changed_at > self.timeout_s and not self._stop.is_set():
                self._peer_silent(int(beat.split()[1]), now - changed_at)

    def _peer_silent(self, last_step: int, silent_s: float) -> None:
        host, pid = self.store.get(f"who/{self.peer}").decode().split()
        message = (f"rank {self.peer} stopped answering at {step_text(self.step)}: no heartbeat for {silent_s:.0f}s "
                   f"(train.dist_timeout_s={self.timeout_s:g}; rank {self.peer} last reported {step_text(last_step)}, "
                   f"rank {self.rank}, its watcher, is at {step_text(self.step)}). Ending the job")
        local = host == socket.gethostname()
        self._report(message + (f" and killing rank {self.peer} (pid {pid} on this host)" if local else ""),
                     kill=int(pid) if local else None)

    def _report(self, message: str, kill: int | None = None) -> None:
        """Print, record as torchrun's root cause, kill the silent local peer, exit now."""
        print(f"[longctx watchdog] {message}", file=sys.stderr, flush=True)
        try:
            raise PeerStopped(message)
        except PeerStopped as e:
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            get_error_handler().record_exception(e)
        if kill is not None:
            # torchrun names the failure with the earliest (whole-second) timestamp as the root cause:
            # let this rank's record be strictly earlier than the killed peer's
            time.sleep(1.0 - time.time() % 1.0 + 0.01)
            try:
                os.kill(kill, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(1)
