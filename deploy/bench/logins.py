#!/usr/bin/env python3
"""Memory of `callmeback serve` under a burst of sign-ins, measured from outside.

Starts `callmeback serve` (the binary given, default target/release/callmeback) on a database
and stream of its own, registers one user, then sends N sign-ins at once (each from its own
client address: serve trusts loopback as its proxy here, so the per-address login limit does
not stop the burst) and reports serve's resident memory before and at its peak (VmHWM, from
/proc), and how the sign-ins were answered (200, 503 busy with Retry-After, other).

    python3 deploy/bench/logins.py [--bin PATH] [--logins 100] [--users 20] [--port 18931]

Needs Postgres and NATS as the tests do (DATABASE_URL's server, NATS_URL). Standard library only.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid


def proc_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def post(base, path, body, ip):
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "x-forwarded-for": ip},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        headers = dict(e.headers)
        try:
            headers["x-error-code"] = json.loads(e.read())["error"]["code"]
        except Exception:
            pass
        return e.code, headers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/callmeback")
    ap.add_argument("--logins", type=int, default=100)
    ap.add_argument("--port", type=int, default=18931)
    ap.add_argument("--users", type=int, default=20)
    args = ap.parse_args()

    run = uuid.uuid4().hex[:8]
    base_db = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/callmeback")
    db = base_db.rsplit("/", 1)[0] + f"/callmeback_bench_logins_{run}"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": db,
        "NATS_URL": os.environ.get("NATS_URL", "nats://127.0.0.1:4222"),
        "NATS_STREAM": f"CMB_BENCH_LOGINS_{run}",
        "NATS_SUBJECT_PREFIX": f"cmb.benchlogins{run}",
        "NATS_CONSUMER_PREFIX": f"cmbbl{run}",
        "HTTP_ADDR": f"127.0.0.1:{args.port}",
        "TRUSTED_PROXIES": "127.0.0.1,::1",
        "RUST_LOG": "warn",
    }
    # The pool's settings, to compare (PASSWORD_HASH_CONCURRENCY, PASSWORD_HASH_QUEUE).
    env.update({k: v for k, v in os.environ.items() if k.startswith(("PASSWORD_HASH_", "MALLOC_"))})
    log = open(f"/tmp/callmeback-bench-logins-{run}.log", "w")
    serve = subprocess.Popen([args.bin, "serve"], env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            if serve.poll() is not None:
                sys.exit(f"serve exited: see {log.name}")
            time.sleep(0.5)
        # The sign-ins are spread over a few accounts: a hundred at once on one account would
        # mostly measure its aggregate's write conflicts.
        password = "Bench!pass1"
        emails = []
        for u in range(args.users):
            email = f"bench-{run}-{u}@example.com"
            status, _ = post(base, "/api/auth/register",
                             {"name": "Bench", "email": email, "password": password,
                              "phone": "+1555" + str((int(run, 16) + u) % 10_000_000).zfill(7)},
                             f"198.18.0.{u + 1}")
            assert status == 201, f"register: {status}"
            emails.append(email)
        # Start-up work (greeting synthesis, the system personas' knowledge indexing) settles
        # first: wait until the resident size has not grown for 5 s (at most a minute).
        settled_at, last = time.monotonic(), proc_kib(serve.pid, "VmRSS")
        deadline = time.monotonic() + 60
        while time.monotonic() - settled_at < 5 and time.monotonic() < deadline:
            time.sleep(0.5)
            now = proc_kib(serve.pid, "VmRSS")
            if now > last + 1024:
                settled_at = time.monotonic()
            last = max(last, now)
        before = proc_kib(serve.pid, "VmRSS")
        peak_before = proc_kib(serve.pid, "VmHWM")
        results = []
        lock = threading.Lock()

        def login(n):
            ip = f"198.18.{1 + n // 250}.{n % 250 + 1}"
            status, headers = post(base, "/api/auth/login",
                                   {"email": emails[n % len(emails)], "password": password}, ip)
            with lock:
                retry = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
                results.append((status, retry, headers.get("x-error-code")))

        threads = [threading.Thread(target=login, args=(n,)) for n in range(args.logins)]
        started = time.monotonic()
        for t in threads:
            t.start()
        peak_sampled = 0
        while any(t.is_alive() for t in threads):
            peak_sampled = max(peak_sampled, proc_kib(serve.pid, "VmRSS"))
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        peak = proc_kib(serve.pid, "VmHWM")
        after = proc_kib(serve.pid, "VmRSS")
        ok = sum(1 for s, _, _ in results if s == 200)
        busy = [r for s, r, _ in results if s == 503]
        codes = {}
        for s, _, code in results:
            if s == 503:
                codes[code] = codes.get(code, 0) + 1
        other = sorted({s for s, _, _ in results if s not in (200, 503)})
        report = {
            "logins": args.logins,
            "ok": ok,
            "busy_503": len(busy),
            "busy_with_retry_after": sum(1 for r in busy if r),
            "busy_codes": codes,
            "other_statuses": other,
            "seconds": round(elapsed, 2),
            "rss_before_mib": round(before / 1024, 1),
            "rss_peak_before_burst_mib": round(peak_before / 1024, 1),
            "rss_peak_mib": round(max(peak, peak_sampled) / 1024, 1),
            "rss_after_mib": round(after / 1024, 1),
        }
        print(f"{args.logins} concurrent sign-ins: {ok} signed in, {len(busy)} answered 503 "
              f"{codes}, "
              f"other {other}, in {elapsed:.1f} s")
        print(f"serve RSS: {report['rss_before_mib']} MiB before (peak so far "
              f"{report['rss_peak_before_burst_mib']}), peak {report['rss_peak_mib']} MiB, "
              f"{report['rss_after_mib']} MiB after")
        print(json.dumps(report))
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
        subprocess.run(["psql", base_db, "-qc", f"DROP DATABASE IF EXISTS callmeback_bench_logins_{run} WITH (FORCE)"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
