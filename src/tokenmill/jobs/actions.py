"""The job-control codes: what every rank does at a step boundary. They are ordered so that the loop can reduce
them with MAX over ranks (one all-reduce decides for all) and the strongest request wins."""

from __future__ import annotations

from enum import IntEnum


class Action(IntEnum):
    """What every rank does at a step boundary; when several are asked for at once, the highest wins."""

    NONE = 0
    SAVE = 1  # an exact-resume checkpoint (reason "manual"); training continues
    STOP = 2  # a checkpoint, then exit 0
    ABORT = 3  # exit without a checkpoint, with its own exit code

    @property
    def word(self) -> str:
        return self.name.lower()


REQUESTS = {action.word: action for action in (Action.SAVE, Action.STOP, Action.ABORT)}  # what a user can ask
