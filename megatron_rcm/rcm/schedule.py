"""Which network a training step updates: the student or the fake-score critic (rcm_math.md section 5).

A step is a student step if there is no critic, or step < warmup, or (step - warmup) mod
student_update_freq == 0; otherwise it is a critic step. Everything here is a pure function of the
global step, so a resumed run needs no extra state.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StudentCriticSchedule"]


@dataclass(frozen=True)
class StudentCriticSchedule:
    has_critic: bool
    """False for algorithms without a fake-score critic (sCM, dCM): every step is a student step."""
    warmup: int = 0
    """Steps at the start that are all student steps (the sCM tangent warm-up in rCM)."""
    student_update_freq: int = 5
    """After the warm-up, one student step every this many steps (5 for Wan 1.3B, 10 for 14B)."""

    def __post_init__(self):
        if self.student_update_freq < 1:
            raise ValueError("student_update_freq must be >= 1")

    def is_student_step(self, step: int) -> bool:
        return (
            not self.has_critic or step < self.warmup or (step - self.warmup) % self.student_update_freq == 0
        )

    def num_student_steps(self, step: int) -> int:
        """Number of student steps among steps 0..step-1."""
        if not self.has_critic:
            return step
        after = max(0, step - self.warmup)
        return min(step, self.warmup) + -(-after // self.student_update_freq)

    def num_critic_steps(self, step: int) -> int:
        """Number of critic steps among steps 0..step-1."""
        return step - self.num_student_steps(step)
