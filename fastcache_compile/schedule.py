"""Where a call sits in its generation: generation boundaries and the step index, from the timestep.

One ``Schedule`` belongs to one model instance under one compile and is shared by every graph Dynamo
made for that instance, so a generation whose calls land in two graphs (a first latent of another
layout, noise made outside ``inference_mode``) is still counted, warmed up and finished once.

Rules, for a call of conditioning stream ``k`` at timestep ``t`` (``None`` when unknown):

* ``t`` differs from the last timestep: the generation's first two distinct timesteps fix its
  direction (decreasing noise levels or increasing flow times); a step in that direction advances
  the step index, a jump against it starts the next generation.
* same ``t``, a stream not yet seen at this step: the same step (split-call CFG: cond, then uncond).
* same ``t``, a stream already seen at this step: a Heun-style repeated timestep advances the step;
  before any direction is known (the generation has one timestep so far) it is the next 1-step
  generation. Without a timestep a repeated stream always advances the step: a new generation then
  needs ``reset``.
* with ``num_steps`` known, a step past its last one starts the next generation. A run stopped early
  and followed by one that starts at a lower noise level is otherwise taken for its continuation;
  without ``num_steps`` only ``reset`` separates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Schedule:
    generations: int = 0  # generations started since construction or reset; the current one's number
    step: int = 0  # step index within the current generation
    last_t: float | None = None
    direction: int = 0  # +1 increasing, -1 decreasing, 0 not known yet
    num_steps: int | None = None  # steps per generation, if known (``FastCacheConfig.num_steps``)
    _seen: set[bytes] = field(default_factory=set)  # streams that ran at the current step

    def observe(self, stream: bytes, t: float | None) -> tuple[int, int]:
        """Place one call; returns ``(generation, step)``; ``generation`` counts from 1."""
        if self.generations == 0:
            self._start()
        elif t is not None and self.last_t is not None and t != self.last_t:
            d = 1 if t > self.last_t else -1
            if self.direction in (0, d):
                self.direction = d
                self._advance()
            else:
                self._start()  # jumped against the schedule's direction: a new sampling run
        elif stream in self._seen:
            if t is None or self.direction != 0:
                self._advance()
            else:
                self._start()
        self._seen.add(stream)
        if t is not None:
            self.last_t = t
        return self.generations, self.step

    def reset(self) -> None:
        self.generations, self.step, self.last_t, self.direction = 0, 0, None, 0
        self._seen.clear()

    def _start(self) -> None:
        self.generations += 1
        self.step, self.direction = 0, 0
        self._seen.clear()

    def _advance(self) -> None:
        if self.num_steps is not None and self.step + 1 >= self.num_steps:
            self._start()  # the generation had all its steps: this call begins the next one
            return
        self.step += 1
        self._seen.clear()
