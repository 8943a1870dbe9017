"""Retraining on its own: start the ``spine`` training when enough new final labels arrived.

Settings (``--conf KEY VALUE``, shown in ``/info`` under ``auto_train``):

| key | default | meaning |
|---|---|---|
| ``auto_train`` | ``true`` | start trainings without a train request |
| ``auto_train_min_labels`` | ``20`` | the first training once this many images have a ``final`` label |
| ``auto_train_new_labels`` | ``5`` | retrain once this many new final labels arrived since the last run started |
| ``auto_train_interval`` | ``0`` | minutes between periodic checks; a check retrains when anything new arrived (0 = label counts only) |

The decision is :func:`decide` (pure). It is taken on every label save, after a run ends,
once at start-up and, with an interval, periodically. One training at a time: while a
train task is submitted or running nothing is started, and labels saved meanwhile count
for the next run ("new" = final-labelled images that were not labelled when the last run
started). The counters live in ``model_dir/autotrain.json`` (written atomically) so that
a restarted server goes on where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

from lib.io import atomic_write_text

logger = logging.getLogger(__name__)

STATE_FILENAME = "autotrain.json"
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def _parse_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ValueError(f"{key} must be true or false, got {value!r}")


@dataclass(frozen=True)
class AutoTrainSettings:
    enabled: bool = True
    min_labels: int = 20
    new_labels: int = 5
    interval_minutes: float = 0.0

    def __post_init__(self):
        if self.min_labels < 1:
            raise ValueError(f"auto_train_min_labels must be at least 1, got {self.min_labels}")
        if self.new_labels < 1:
            raise ValueError(f"auto_train_new_labels must be at least 1, got {self.new_labels}")
        if self.interval_minutes < 0:
            raise ValueError(f"auto_train_interval must be 0 or more minutes, got {self.interval_minutes}")

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any] | None) -> "AutoTrainSettings":
        conf = conf or {}
        d = cls()
        return cls(
            enabled=_parse_bool(conf.get("auto_train", d.enabled), "auto_train"),
            min_labels=int(conf.get("auto_train_min_labels", d.min_labels)),
            new_labels=int(conf.get("auto_train_new_labels", d.new_labels)),
            interval_minutes=float(conf.get("auto_train_interval", d.interval_minutes)),
        )


@dataclass
class AutoTrainState:
    """What is persisted: the labels present when the last run started, when, and how many runs."""

    final_labels_at_last_start: int = 0
    labeled_at_last_start: List[str] = field(default_factory=list)
    last_start: Optional[float] = None  # seconds since the epoch
    runs_started: int = 0
    last_reason: str = ""

    def new_labels(self, labeled: Iterable[str]) -> int:
        return len(set(labeled) - set(self.labeled_at_last_start))

    def summary(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop("labeled_at_last_start")
        d["last_start_iso"] = (time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.last_start))
                               if self.last_start is not None else None)
        return d


def load_state(path: str) -> AutoTrainState:
    """The persisted state; a fresh one when the file is missing or unreadable (logged)."""
    if not os.path.exists(path):
        return AutoTrainState()
    try:
        with open(path) as f:
            raw = json.load(f)
        known = AutoTrainState.__dataclass_fields__
        state = AutoTrainState(**{k: v for k, v in raw.items() if k in known})
        state.labeled_at_last_start = [str(i) for i in state.labeled_at_last_start]
        return state
    except (OSError, ValueError, TypeError) as e:
        logger.error(f"Auto-train state {path} unreadable ({e}): starting the counters afresh")
        return AutoTrainState()


def save_state(path: str, state: AutoTrainState) -> None:
    """Write ``state`` atomically (:func:`lib.io.atomic_write_text`)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_text(path, json.dumps(asdict(state), indent=1))


@dataclass(frozen=True)
class Decision:
    start: bool
    reason: str


def decide(settings: AutoTrainSettings, final_labels: int, new_labels: int, runs_started: int,
           training_busy: bool, periodic: bool = False, last_start: Optional[float] = None,
           now: Optional[float] = None) -> Decision:
    """Whether to start a training now, and why (or why not).

    ``final_labels``: images with a final label now; ``new_labels``: those of them that
    had none when the last run started; ``periodic``: the check comes from the timer.
    """
    if not settings.enabled:
        return Decision(False, "auto_train is off")
    if training_busy:
        return Decision(False, "a training is already running")
    if final_labels < settings.min_labels:
        return Decision(False, f"{final_labels} final labels, first training at {settings.min_labels}")
    if runs_started == 0:
        return Decision(True, f"first training: {final_labels} final labels (min {settings.min_labels})")
    if new_labels >= settings.new_labels:
        return Decision(True, f"{new_labels} new final labels since the last run (threshold {settings.new_labels})")
    if periodic and settings.interval_minutes > 0 and new_labels > 0:
        now = time.time() if now is None else now
        if last_start is None or now - last_start >= settings.interval_minutes * 60:
            return Decision(True, f"periodic: {new_labels} new final labels, "
                                  f"last run over {settings.interval_minutes:g} min ago")
        return Decision(False, f"{new_labels} new final labels, periodic retrain not yet due")
    return Decision(False, f"{new_labels} new final labels, retrain at {settings.new_labels}")


class AutoTrainer:
    """Takes the decision and starts the run; knows nothing of MONAI Label (callables given).

    - ``labeled_images()``: ids of the images with a final label now;
    - ``training_busy()``: whether a train task is submitted or running;
    - ``start_training()``: start one; True if it started (False: "already running");
    - ``wait_started()`` / ``wait_finished()``: block until the run started / ended.
    """

    def __init__(self, model_dir: str, settings: AutoTrainSettings, labeled_images: Callable[[], List[str]],
                 training_busy: Callable[[], bool], start_training: Callable[[], bool],
                 wait_finished: Callable[[], None] | None = None):
        self.settings = settings
        self.path = os.path.join(model_dir, STATE_FILENAME)
        self.state = load_state(self.path)
        self._labeled_images, self._training_busy = labeled_images, training_busy
        self._start_training, self._wait_finished = start_training, wait_finished
        self._lock = threading.Lock()
        self._timer: threading.Thread | None = None
        self._stop = threading.Event()

    def check(self, trigger: str = "label", periodic: bool = False) -> Decision:
        """Decide and, if so, start a training; never raises (a label save must not fail)."""
        try:
            with self._lock:
                labeled = list(self._labeled_images())
                state = self.state
                decision = decide(self.settings, len(labeled), state.new_labels(labeled), state.runs_started,
                                  self._training_busy(), periodic=periodic, last_start=state.last_start)
                if not decision.start:
                    logger.debug(f"Auto-train ({trigger}): not starting: {decision.reason}")
                    return decision
                if not self._start_training():
                    return Decision(False, "a training is already running")
                self.state = AutoTrainState(final_labels_at_last_start=len(labeled),
                                            labeled_at_last_start=sorted(labeled), last_start=time.time(),
                                            runs_started=state.runs_started + 1, last_reason=decision.reason)
                save_state(self.path, self.state)
                logger.info(f"Auto-train ({trigger}): started run {self.state.runs_started}: {decision.reason}")
            if self._wait_finished is not None:  # labels saved during the run may be enough for the next
                threading.Thread(target=self._after_run, name="autotrain-after-run", daemon=True).start()
            return decision
        except Exception:
            logger.exception(f"Auto-train ({trigger}) check failed")
            return Decision(False, "error")

    def _after_run(self) -> None:
        try:
            self._wait_finished()
        except Exception:
            logger.exception("Auto-train: waiting for the run failed")
            return
        self.check("after run")

    def info(self) -> Dict[str, Any]:
        state = self.state  # replaced whole, never mutated: no lock needed to read
        try:
            labeled = list(self._labeled_images())
        except Exception:
            labeled = []
        return {
            "enabled": self.settings.enabled,
            "min_labels": self.settings.min_labels,
            "new_labels": self.settings.new_labels,
            "interval_minutes": self.settings.interval_minutes,
            "final_labels": len(labeled),
            "new_final_labels": state.new_labels(labeled),
            **state.summary(),
        }

    def start_periodic(self, startup_delay: float = 5.0) -> None:
        """One check shortly after start-up, then every ``interval`` (if any): a daemon thread."""
        if self._timer is not None or not self.settings.enabled:
            return
        self._timer = threading.Thread(target=self._run_periodic, args=(startup_delay,), name="autotrain",
                                       daemon=True)
        self._timer.start()

    def _run_periodic(self, startup_delay: float) -> None:
        if self._stop.wait(startup_delay):
            return
        self.check("start-up")
        interval = self.settings.interval_minutes * 60
        if interval <= 0:
            return
        tick = min(interval, 60.0)  # the decision compares with the last start: ticks may be finer
        while not self._stop.wait(tick):
            self.check("periodic", periodic=True)

    def stop(self) -> None:
        self._stop.set()
