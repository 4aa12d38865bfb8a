"""doit state and up-to-date checks tuned for multi-GiB step outputs.

- `StatChecker`: a file dependency is unchanged while its (mtime, size) are; never hashes,
  so checking a 30 GiB disk image costs one stat().
- `DurableJsonDB`: doit's JSON backend, but written atomically and after every finished
  step, so a SIGKILL keeps the steps that finished before it.
"""

from __future__ import annotations

import os
from typing import Any

from doit.dependency import FileChangedChecker, JsonDB

from archkernel.host.files import write_text

BACKEND_NAME = "archkernel-json"


class StatChecker(FileChangedChecker):  # type: ignore[misc]
    """Modified when the mtime (ns) or the size differ from the saved state."""

    def check_modified(self, file_path: str, file_stat: os.stat_result, state: Any) -> bool:
        return list(state or ()) != [file_stat.st_mtime_ns, file_stat.st_size]

    def get_state(self, dep: str, current_state: Any) -> list[int] | None:
        st = os.stat(dep)
        new = [st.st_mtime_ns, st.st_size]
        return None if current_state is not None and list(current_state) == new else new


class DurableJsonDB(JsonDB):  # type: ignore[misc]
    """JSON state written atomically, and each time doit records a finished task."""

    desc = "JSON file, saved after every task"

    def __init__(self, name: str, codec: Any, **kwargs: Any) -> None:
        super().__init__(name, codec, **kwargs)
        # The text the file holds; a dump of the same text is skipped, so a run that
        # changes nothing (the cached boot path) writes and fsyncs nothing.
        self._saved = self.codec.encode(self._db) if os.path.exists(name) else None

    def dump(self) -> None:
        text = self.codec.encode(self._db)
        if text == self._saved:
            return
        write_text(self.name, text)
        self._saved = text

    def set(self, task_id: str, dependency: str, value: Any) -> None:
        if dependency == "deps:":
            # doit keeps file_dep in a set (order varies per process); doit compares it as
            # a set, so sorting it makes the saved text depend only on the state.
            value = sorted(value)
        super().set(task_id, dependency, value)
        # `deps:` is the last value doit saves for a successful task.
        if dependency == "deps:":
            self.dump()

    def remove(self, task_id: str) -> None:
        super().remove(task_id)
        self.dump()

    def remove_all(self) -> None:
        super().remove_all()
        self.dump()
