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
started); a check refused because a run is busy is taken again when that run ends.
Images held out for testing (:func:`lib.lifecycle.splits.test_ids`) are never counted.

Every run moves the counters, also one an annotator starts (``POST /train/spine``): the
train task calls :func:`record_run_start`, which counts a run the auto-trainer did not
start itself. The counters live in ``model_dir/autotrain.json`` (written atomically,
under a file lock, read again when another process changed it) so that a restarted
server goes on where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

from filelock import FileLock

from lib.lifecycle.splits import split_path, test_ids
from lib.pipeline.io import atomic_write_text

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
    #: False between the auto-trainer starting a run and that run's :func:`record_run_start`
    run_claimed: bool = True

    def new_labels(self, labeled: Iterable[str]) -> int:
        return len(set(labeled) - set(self.labeled_at_last_start))

    def summary(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop("labeled_at_last_start")
        d.pop("run_claimed")
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
    """Write ``state`` atomically (:func:`lib.pipeline.io.atomic_write_text`)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_text(path, json.dumps(asdict(state), indent=1))


def state_lock(path: str) -> FileLock:
    """The lock every writer of the counters holds (the server, and train processes)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return FileLock(f"{path}.lock")


def record_run_start(model_dir: str, labeled: Iterable[str], now: Optional[float] = None) -> AutoTrainState:
    """Called by the train task as a run starts, with the ids of the images it learns from.

    A run the auto-trainer started was counted when it started it (``run_claimed``
    False): it is only claimed. Any other run (a train request) is counted here, so that
    the labels it trained on are no longer "new".
    """
    path = os.path.join(model_dir, STATE_FILENAME)
    with state_lock(path):
        state = load_state(path)
        if not state.run_claimed:
            state.run_claimed = True
        else:
            excluded = set(test_ids(split_path(model_dir)))
            labeled = sorted(set(labeled) - excluded)
            state = AutoTrainState(final_labels_at_last_start=len(labeled), labeled_at_last_start=labeled,
                                   last_start=time.time() if now is None else now,
                                   runs_started=state.runs_started + 1, last_reason="train request")
        save_state(path, state)
    return state


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
        self.model_dir = model_dir
        self.path = os.path.join(model_dir, STATE_FILENAME)
        self._state, self._state_stamp = load_state(self.path), self._stamp()
        self._labeled_images, self._training_busy = labeled_images, training_busy
        self._start_training, self._wait_finished = start_training, wait_finished
        self._lock = threading.Lock()
        self._waiting = threading.Lock()  # held by the one thread that waits for a busy run to end
        self._timer: threading.Thread | None = None
        self._stop = threading.Event()
        # what the last check decided, shown in /info: clients wait on it instead of sleeping
        self._checks, self._last_check = 0, None

    def _stamp(self):
        try:
            stat = os.stat(self.path)
            return stat.st_mtime_ns, stat.st_size
        except OSError:
            return None

    @property
    def state(self) -> AutoTrainState:
        """The counters, read again when a train process changed the file (:func:`record_run_start`)."""
        stamp = self._stamp()
        if stamp != self._state_stamp:
            self._state, self._state_stamp = load_state(self.path), stamp
        return self._state

    def labeled(self) -> List[str]:
        """Images with a final label that training may use (test images left out)."""
        excluded = set(test_ids(split_path(self.model_dir)))
        return [i for i in self._labeled_images() if i not in excluded]

    def check(self, trigger: str = "label", periodic: bool = False) -> Decision:
        """Decide and, if so, start a training; never raises (a label save must not fail).
        Every check is counted, and the last one is reported by :meth:`info`."""
        decision = self._check(trigger, periodic)
        self._last_check = {"trigger": trigger, "started": decision.start, "reason": decision.reason,
                            "at": time.time()}
        self._checks += 1
        return decision

    def _check(self, trigger: str, periodic: bool) -> Decision:
        try:
            with self._lock:
                labeled = self.labeled()
                state = self.state
                busy = self._training_busy()
                decision = decide(self.settings, len(labeled), state.new_labels(labeled), state.runs_started,
                                  busy, periodic=periodic, last_start=state.last_start)
                if not decision.start:
                    logger.debug(f"Auto-train ({trigger}): not starting: {decision.reason}")
                    if busy and self.settings.enabled:  # e.g. a run someone else started: look again after it
                        self._check_after_run()
                    return decision
                with state_lock(self.path):
                    if not self._start_training():
                        return Decision(False, "a training is already running")
                    self._state = AutoTrainState(final_labels_at_last_start=len(labeled),
                                                 labeled_at_last_start=sorted(labeled), last_start=time.time(),
                                                 runs_started=state.runs_started + 1, last_reason=decision.reason,
                                                 run_claimed=False)
                    save_state(self.path, self._state)
                    self._state_stamp = self._stamp()
                logger.info(f"Auto-train ({trigger}): started run {self._state.runs_started}: {decision.reason}")
            self._check_after_run()  # labels saved during the run may be enough for the next
            return decision
        except Exception:
            logger.exception(f"Auto-train ({trigger}) check failed")
            return Decision(False, "error")

    def _check_after_run(self) -> None:
        """One thread (at most) that waits for the running training and then checks again."""
        if self._wait_finished is None or not self._waiting.acquire(blocking=False):
            return
        threading.Thread(target=self._after_run, name="autotrain-after-run", daemon=True).start()

    def _after_run(self) -> None:
        try:
            self._wait_finished()
        except Exception:
            logger.exception("Auto-train: waiting for the run failed")
            return
        finally:
            self._waiting.release()
        self.check("after run")

    def info(self) -> Dict[str, Any]:
        state = self.state  # replaced whole, never mutated: no lock needed to read
        try:
            labeled = self.labeled()
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
            "checks": self._checks,
            "last_check": self._last_check,
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
