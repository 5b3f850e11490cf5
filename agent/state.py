"""The agent's state machine: an explicit table of allowed transitions."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class AgentState(str, enum.Enum):
    IDLE = "idle"  # created, driver not yet running
    RUNNING = "running"  # acquiring and deciding
    PAUSED = "paused"  # beam blanked, waiting for resume (operator)
    FAULTED = "faulted"  # beam blanked, device lost or failed; waiting for it to come back
    STOPPING = "stopping"  # finishing: blank, close the log
    STOPPED = "stopped"  # ended normally
    ABORTED = "aborted"  # ended at once on request or on an unrecoverable error


ALLOWED: dict[AgentState, frozenset[AgentState]] = {
    AgentState.IDLE: frozenset({AgentState.RUNNING, AgentState.FAULTED, AgentState.STOPPING, AgentState.ABORTED}),
    AgentState.RUNNING: frozenset({AgentState.PAUSED, AgentState.FAULTED, AgentState.STOPPING, AgentState.ABORTED}),
    AgentState.PAUSED: frozenset({AgentState.RUNNING, AgentState.FAULTED, AgentState.STOPPING, AgentState.ABORTED}),
    AgentState.FAULTED: frozenset({AgentState.RUNNING, AgentState.PAUSED, AgentState.STOPPING, AgentState.ABORTED}),
    AgentState.STOPPING: frozenset({AgentState.STOPPED, AgentState.ABORTED}),
    AgentState.STOPPED: frozenset(),
    AgentState.ABORTED: frozenset(),
}

class IllegalTransition(RuntimeError):
    pass


@dataclass
class StateMachine:
    state: AgentState = AgentState.IDLE
    history: list[tuple[AgentState, AgentState, str]] = field(default_factory=list)

    def to(self, target: AgentState, reason: str = "") -> AgentState:
        """Move to ``target``; raises :class:`IllegalTransition` if the table forbids it."""
        if target == self.state:
            return self.state
        if target not in ALLOWED[self.state]:
            raise IllegalTransition(f"state {self.state.value!r} cannot go to {target.value!r} ({reason})")
        self.history.append((self.state, target, reason))
        self.state = target
        return target

    @property
    def finished(self) -> bool:
        return self.state in (AgentState.STOPPED, AgentState.ABORTED)
