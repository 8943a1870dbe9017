"""Load a running spine server with concurrent infers and label saves; report how it held.

    python -m lib.loadtest --url http://127.0.0.1:8000 --clients 8 --seconds 60 [--json]

Each client repeatedly runs an infer on a datastore image (``POST /infer/spine``) or,
with probability ``--label-share``, saves an existing final label again (download it,
``PUT /datastore/label`` with the same bytes: the datastore ends as it started). The
run is bounded by ``--seconds`` and ``--max-requests``; only loopback servers are
accepted, so it cannot be pointed at someone else's machine. Prints throughput,
p50/p95 latency per request kind (all answers, and the 200s alone), the count of
each status (``timeout`` and ``error`` for requests without an HTTP answer), and the
server's resident memory (its process and children, MB) before, at the peak of and
after the load: the process listening on the URL's port, or ``--server-pid``. A client
told 503/429 waits as ``Retry-After`` says, at most ``--max-backoff`` seconds, as a
polite client would, instead of hammering the server.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlparse

import numpy as np
import psutil
import requests

from lib.tools.measure import MemorySampler

MAX_CLIENTS = 64
MAX_SECONDS = 3600
BUSY_STATUSES = ("429", "503")


@dataclass
class Outcome:
    kind: str  # "infer" | "label"
    status: str  # HTTP status code, "timeout" or "error"
    seconds: float
    retry_after: float = 0.0  # seconds the server asked a refused client to wait


@dataclass
class Plan:
    """What the clients send: image ids to infer on, and final labels to save again."""

    images: List[str]
    labels: Dict[str, bytes] = field(default_factory=dict)


def require_loopback(url: str) -> str:
    """``url`` without a trailing slash if its host resolves only to loopback addresses."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parsed.hostname, None)}
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve {parsed.hostname!r}: {e}") from None
    outside = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if outside:
        raise ValueError(f"refusing to load {parsed.hostname!r} ({', '.join(outside)}): loopback servers only")
    return url.rstrip("/")


def discover(url: str, timeout: float) -> Plan:
    """Image ids from the datastore, and the bytes of every final label (to save again)."""
    objects = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=timeout).json()["objects"]
    plan = Plan(images=sorted(objects))
    for image_id, obj in sorted(objects.items()):
        if "final" in obj.get("labels", {}):
            r = requests.get(f"{url}/datastore/label", params={"label": image_id, "tag": "final"}, timeout=timeout)
            if r.status_code == 200:
                plan.labels[image_id] = r.content
    if not plan.images:
        raise ValueError(f"{url} has no images in its datastore: nothing to infer on")
    return plan


def infer(session: requests.Session, url: str, model: str, plan: Plan, timeout: float) -> requests.Response:
    image_id = random.choice(plan.images)
    return session.post(f"{url}/infer/{model}", params={"image": image_id, "output": "json"}, timeout=timeout)


def save_label(session: requests.Session, url: str, plan: Plan, timeout: float) -> requests.Response:
    image_id = random.choice(sorted(plan.labels))
    return session.put(
        f"{url}/datastore/label",
        params={"image": image_id, "tag": "final"},
        data={"params": "{}"},
        files={"label": (f"{image_id}.nii.gz", plan.labels[image_id])},
        timeout=timeout,
    )


def timed(kind: str, call) -> Outcome:
    """Run one request; its status (or why it has none) and latency."""
    start = time.perf_counter()
    retry_after = 0.0
    try:
        response = call()
        status = str(response.status_code)
        if status in BUSY_STATUSES:
            try:
                retry_after = max(float(response.headers.get("Retry-After", 1)), 0.0)
            except ValueError:
                retry_after = 1.0
    except requests.Timeout:
        status = "timeout"
    except requests.RequestException:
        status = "error"
    return Outcome(kind, status, time.perf_counter() - start, retry_after)


def listening_pid(url: str) -> Optional[int]:
    """The process listening on the (loopback) URL's port, or None where it cannot be seen."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except (psutil.Error, OSError):
        pass  # listing other processes' sockets needs privileges on some systems
    return None


class Budget:
    """Shared bound on the number of requests and the time in which new ones start."""

    def __init__(self, max_requests: int, seconds: float):
        self.left, self.deadline = max_requests, time.monotonic() + seconds
        self.taken = 0
        self.lock = threading.Lock()

    def take(self) -> Optional[int]:
        """The index of the next request, or None when the budget is spent."""
        with self.lock:
            if self.left <= 0 or time.monotonic() >= self.deadline:
                return None
            self.left -= 1
            self.taken += 1
            return self.taken - 1


def is_label_request(index: int, label_share: float) -> bool:
    """Spread label saves evenly over the request sequence (not by chance: a short run with few
    requests still mixes both kinds once a few requests have started)."""
    return int((index + 1) * label_share) > int(index * label_share)


def client(url: str, model: str, plan: Plan, budget: Budget, label_share: float, timeout: float,
           outcomes: List[Outcome], max_backoff: float = 5.0) -> None:
    """One client: requests back to back until the budget is spent, waiting when told to."""
    with requests.Session() as session:
        while (index := budget.take()) is not None:
            if plan.labels and is_label_request(index, label_share):
                outcome = timed("label", lambda: save_label(session, url, plan, timeout))
            else:
                outcome = timed("infer", lambda: infer(session, url, model, plan, timeout))
            outcomes.append(outcome)  # list.append is atomic under the GIL
            if outcome.retry_after:
                time.sleep(min(outcome.retry_after, max_backoff, max(budget.deadline - time.monotonic(), 0)))


def summarise(outcomes: List[Outcome], wall_s: float) -> Dict[str, Dict]:
    """Per kind: count, ok, throughput, p50/p95 latency (s) of all answers and of the 200s, statuses."""
    report = {}
    for kind in sorted({o.kind for o in outcomes}):
        mine = [o for o in outcomes if o.kind == kind]
        latencies = np.array([o.seconds for o in mine])
        ok = np.array([o.seconds for o in mine if o.status == "200"])
        report[kind] = {
            "count": len(mine),
            "ok": len(ok),
            "per_s": round(len(mine) / wall_s, 3) if wall_s else 0.0,
            "ok_per_s": round(len(ok) / wall_s, 3) if wall_s else 0.0,
            "p50_s": round(float(np.percentile(latencies, 50)), 3),
            "p95_s": round(float(np.percentile(latencies, 95)), 3),
            "ok_p50_s": round(float(np.percentile(ok, 50)), 3) if len(ok) else None,
            "ok_p95_s": round(float(np.percentile(ok, 95)), 3) if len(ok) else None,
            "statuses": dict(Counter(o.status for o in mine)),
        }
    return report


def run(url: str, clients: int = 8, seconds: float = 60, max_requests: int = 10000, model: str = "spine",
        label_share: float = 0.25, timeout: float = 120, max_backoff: float = 5.0,
        server_pid: Optional[int] = None) -> Tuple[Dict[str, Dict], float, Optional[Dict[str, float]]]:
    """Run the load; ``(summary per kind, wall seconds, server memory or None)``."""
    if not 1 <= clients <= MAX_CLIENTS or not 0 < seconds <= MAX_SECONDS or max_requests < 1:
        raise ValueError(f"need 1..{MAX_CLIENTS} clients, 0..{MAX_SECONDS} seconds and max_requests >= 1")
    url = require_loopback(url)
    plan = discover(url, timeout)
    budget, outcomes = Budget(max_requests, seconds), []
    threads = [threading.Thread(target=client, args=(url, model, plan, budget, label_share, timeout, outcomes,
                                                     max_backoff), daemon=True) for _ in range(clients)]
    with MemorySampler(server_pid or listening_pid(url)) as memory:
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    return summarise(outcomes, wall), wall, memory.report()


def format_table(summary: Dict[str, Dict], wall_s: float, memory: Optional[Dict[str, float]] = None) -> str:
    lines = [f"{'kind':<6} {'count':>6} {'ok':>6} {'req/s':>7} {'ok/s':>7} {'p50 s':>7} {'p95 s':>7} "
             f"{'ok p50':>7} {'ok p95':>7}  statuses"]
    for kind, s in summary.items():
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(s["statuses"].items()))
        ok_p50, ok_p95 = (f"{v:>7.2f}" if v is not None else f"{'-':>7}" for v in (s["ok_p50_s"], s["ok_p95_s"]))
        lines.append(f"{kind:<6} {s['count']:>6} {s['ok']:>6} {s['per_s']:>7.2f} {s['ok_per_s']:>7.2f} "
                     f"{s['p50_s']:>7.2f} {s['p95_s']:>7.2f} {ok_p50} {ok_p95}  {statuses}")
    lines.append(f"wall time {wall_s:.1f} s")
    if memory:
        lines.append(f"server memory (pid {memory['pid']}, with children): {memory['start_mb']:.0f} MB before, "
                     f"{memory['peak_mb']:.0f} MB peak, {memory['end_mb']:.0f} MB after")
    else:
        lines.append("server memory: not measured (its process was not found; pass --server-pid)")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60, help="new requests start only within this time")
    parser.add_argument("--max-requests", type=int, default=10000)
    parser.add_argument("--model", default="spine")
    parser.add_argument("--label-share", type=float, default=0.25, help="share of requests that save a label")
    parser.add_argument("--timeout", type=float, default=120, help="per request, seconds")
    parser.add_argument("--max-backoff", type=float, default=5.0,
                        help="longest wait (s) after a 503/429, whatever Retry-After says")
    parser.add_argument("--server-pid", type=int, help="server process to measure (default: the one on the port)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        summary, wall, memory = run(args.url, args.clients, args.seconds, args.max_requests, args.model,
                                    args.label_share, args.timeout, args.max_backoff, args.server_pid)
    except (ValueError, requests.RequestException) as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"summary": summary, "wall_s": round(wall, 3), "server_memory": memory}) if args.json
          else format_table(summary, wall, memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
