"""Durations: '50000it', '160ep', '0'. The one place epochs become steps.

Users write training lengths and rewind points in iterations or epochs, as the
paper does. They stay strings in the config, in one spelling (`canonical`: a bare
number is iterations, so '500' is '500it'), and become step counts only here,
once the number of steps per epoch of the dataset is known.
"""

import dataclasses
import re

_PATTERN = re.compile(r"^\s*(\d+)\s*(it|ep)?\s*$")


@dataclasses.dataclass(frozen=True)
class Duration:
    """A length of training: `value` iterations ('it') or epochs ('ep')."""

    value: int
    unit: str  # 'it' or 'ep'

    def to_steps(self, steps_per_epoch: int) -> int:
        """Returns the number of optimizer steps this duration spans."""
        if self.unit == "it":
            return self.value
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
        return self.value * steps_per_epoch

    def __str__(self) -> str:
        return f"{self.value}{self.unit}"


def parse(text: str | int, what: str = "duration") -> Duration:
    """Parses '500it', '5ep' or a bare number of iterations ('0', '500').

    Args:
      text: the string the user typed (or an int, taken as iterations).
      what: the flag or field name, used in the error message.

    Raises:
      ValueError: for anything else, saying what was received and what is accepted.
    """
    if isinstance(text, bool):
        raise ValueError(f"{what}: expected a duration like '500it' or '5ep', got {text!r}.")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{what}: must be >= 0, got {text}.")
        return Duration(text, "it")
    match = _PATTERN.match(str(text))
    if not match:
        raise ValueError(
            f"{what}: cannot read {text!r}. Write a whole number of iterations or epochs "
            "with a unit suffix, e.g. '50000it', '160ep', or '0' (bare numbers are iterations)."
        )
    return Duration(int(match.group(1)), match.group(2) or "it")


def canonical(text: str | int, what: str = "duration") -> str:
    """The one spelling of a duration: '500' and '500it' are '500it'; zero is '0'.

    Configs hold their durations in this spelling (lth_tf.config), so that two
    spellings of one schedule name one run. Zero is '0' whatever its unit: the
    default rewind step, as every run directory has recorded it.

    Raises:
      ValueError: as `parse`.
    """
    duration = parse(text, what)
    return "0" if duration.value == 0 else str(duration)


def to_steps(text: str | int, steps_per_epoch: int, what: str = "duration") -> int:
    """Shorthand for `parse(text).to_steps(steps_per_epoch)`."""
    return parse(text, what).to_steps(steps_per_epoch)


def rewind_point(point, steps_per_epoch: int, total: int, training_steps: str, flag: str) -> int:
    """A rewind point k (a duration, or a step) as a step, checked to lie in the schedule [0, T).

    The one check of every rewind point: imp's --rewind_steps, a branch's
    --rewind_step, stability's --rewind_steps, a W_k asked of a run.

    Args:
      point: '500it', '2ep', '0' or a step (int).
      steps_per_epoch, total: the run's schedule (T = total).
      training_steps: the run's --training_steps, for the message.
      flag: the flag `point` came from, for the message.

    Raises:
      ValueError: `point` is not a duration, or k is not in [0, T).
    """
    k = int(point) if isinstance(point, int) else to_steps(point, steps_per_epoch, flag)
    if not 0 <= k < total:
        raise ValueError(
            f"--{flag}={point} is step {k}, outside the run's schedule [0, {total}) "
            f"(--training_steps={training_steps}). Choose an earlier step."
        )
    return k
