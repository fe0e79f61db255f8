"""CPU priority of writer processes: below training while it runs, at full speed while it waits.

Linux schedules in two ways, and a writer process must rank below training in both:

- with autogroup scheduling (on by default; processes in the root CPU cgroup) the CPU is shared
  between sessions first, each session's autogroup weighted by its own nice value, and only then
  between the threads inside it. A writer process has a session of its own, whose autogroup is set
  to the lowest priority while training runs and back to normal while training waits for it (``close``,
  a slow ``flush``, the end of the training process): an unprivileged process may raise an autogroup's
  priority back, never a thread's.
- in a CPU cgroup other than the root (containers, systemd units, batch schedulers) autogroups do
  not apply and threads compete by their nice values: every thread of a writer process is at nice 19.
  There the writer stays low to the end; it competes only with what shares the job's cgroup, which
  is idle once training waits.
"""

from __future__ import annotations

import contextlib
import os
import time

LOWEST_PRIORITY = 19  # nice value
NORMAL_PRIORITY = 0
# the kernel takes one autogroup change per 100 ms from all unprivileged processes together
_AUTOGROUP_RETRIES = 40
_AUTOGROUP_RETRY_SECONDS = 0.05


def lower(root: int) -> None:
    """``root`` (a writer process), its threads and the processes it started to the lowest priority:
    every thread at nice 19 and every session's autogroup at nice 19 (W&B's service has a session
    of its own). A no-op where the system has neither."""
    if not os.path.isdir("/proc/self/task"):  # not Linux: the whole process at once
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, root, LOWEST_PRIORITY)
        return
    processes = [root, *descendants(root)]
    for pid in processes:
        with contextlib.suppress(OSError):
            for thread in os.listdir(f"/proc/{pid}/task"):  # a nice value is per thread
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, int(thread), LOWEST_PRIORITY)
    _set_autogroups(processes, LOWEST_PRIORITY)


def restore(root: int) -> None:
    """The autogroups of ``root`` and of the processes it started back to normal priority, for
    training is waiting for them (threads stay at nice 19: see the module's docstring)."""
    if os.path.isdir("/proc/self/task"):
        _set_autogroups([root, *descendants(root)], NORMAL_PRIORITY)


def _set_autogroups(processes: list[int], nice: int) -> None:
    """One write per session (its autogroup) among ``processes``, retried while the kernel's rate
    limit refuses it."""
    sessions: dict[int, int] = {}
    for pid in processes:
        with contextlib.suppress(OSError):
            sessions.setdefault(os.getsid(pid), pid)
    for pid in sessions.values():
        for _ in range(_AUTOGROUP_RETRIES):
            try:
                with open(f"/proc/{pid}/autogroup", "w") as group:
                    group.write(str(nice))
                break
            except BlockingIOError:
                time.sleep(_AUTOGROUP_RETRY_SECONDS)
            except OSError:  # no autogroups in this kernel, or the process is gone
                break


def descendants(root: int) -> list[int]:
    """The processes below ``root`` (Linux ``/proc``; none elsewhere)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{entry}/stat") as stat:
                        parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                    children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
