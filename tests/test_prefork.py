"""The prefork process model against a real PostgreSQL: a master, several gevent
workers sharing one listening socket, limits and state in shared memory.

Which worker serves a client is the kernel's choice; the tests find out from the
shared-memory segment (each worker's table of client cancel keys holds the
BackendKeyData pid that psycopg2 reports as get_backend_pid())."""
from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import psycopg2.errors
import pytest
import yaml

from conftest import admin_show, APP_DB, APP_PASSWORD, APP_USER, Poller, backend_count, run_threads, wait_until
from pooler.proc import shm
from pooler.dev.devcluster import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
POOL_KEY = f"pool/{APP_DB}/{APP_USER}"


@pytest.fixture(autouse=True)
def real_threads():
    """These tests drive blocking psycopg2 from threads. If something in this pytest
    process imported locust (which monkey-patches gevent in), threads are greenlets and
    the tests would deadlock: fail clearly instead."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        pytest.fail("threading is gevent-patched in this pytest process (an earlier test "
                    "imported locust); run tests/test_prefork.py in a process of its own")


# -- helpers --------------------------------------------------------------------------------


def prefork_config(pg, workers: int, pool_size: int | None, **extra) -> dict:
    """Trust auth for clients; the pooler logs in to PostgreSQL as app itself."""
    db = {"host": pg.host, "port": pg.port, "dbname": APP_DB, "user": APP_USER,
          "password": APP_PASSWORD}
    if pool_size is not None:
        db["pool_size"] = pool_size
    cfg = {"workers": workers, "pool_mode": "transaction", "max_client_conn": 1000,
           "auth": {"type": "trust"}, "databases": {APP_DB: db}}
    cfg.update(extra)
    return cfg


def start(pooler_factory, cfg: dict):
    p = pooler_factory(cfg)
    wait_until(lambda: len(re.findall(r"worker \d+ \(pid \d+\) started", p.log())) >= cfg["workers"],
               15, message=f"workers did not start:\n{p.log()}")
    return p


def snapshot(p) -> dict:
    seg = shm.Segment.attach(shm.default_path(p.pid))
    try:
        return seg.snapshot()
    finally:
        seg.close()


def owner(snap: dict, backend_pid: int) -> int | None:
    """The worker serving the client that psycopg2 knows by `backend_pid`."""
    for w in snap["workers"]:
        if any(k[0] == backend_pid for k in w["cancel_keys"]):
            return w["id"]
    return None


def direct(pg, sql: str) -> None:
    conn = psycopg2.connect(pg.dsn(APP_DB, APP_USER, APP_PASSWORD))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


def query_one(pg, sql: str, params=()):
    conn = psycopg2.connect(pg.dsn(APP_DB, APP_USER, APP_PASSWORD))
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


def connect(p, **kw):
    return p.connect(password=None, **kw)


def spread_connections(p, per_worker: int, workers: int, limit: int = 60) -> dict[int, list]:
    """Open connections until every worker holds `per_worker` of them."""
    by_worker: dict[int, list] = {w: [] for w in range(workers)}
    extra = []
    for _ in range(limit):
        if all(len(v) >= per_worker for v in by_worker.values()):
            break
        conn = connect(p)
        w = owner(snapshot(p), conn.get_backend_pid())   # written before BackendKeyData was sent
        assert w is not None, "client's cancel key is not in shared memory"
        (by_worker[w] if len(by_worker[w]) < per_worker else extra).append(conn)
    for conn in extra:
        conn.close()
    assert all(len(v) >= per_worker for v in by_worker.values()), \
        f"connections did not reach every worker: { {w: len(v) for w, v in by_worker.items()} }"
    return by_worker


def kill_and_await_respawn(p, w: int) -> int:
    """SIGKILL worker `w`; wait until its replacement has started; its pid."""
    old = snapshot(p)["workers"][w]["pid"]
    os.kill(old, signal.SIGKILL)
    new = wait_until(lambda: snapshot(p)["workers"][w]["pid"] not in (0, old) and
                     snapshot(p)["workers"][w]["pid"], 10)
    p.wait_for_log(rf"worker {w} \(pid {new}\) started")
    return new


def refused(p) -> bool:
    """A new connection is refused (the pooler no longer listens)."""
    try:
        connect(p, connect_timeout=2).close()
    except psycopg2.OperationalError as exc:
        return "refused" in str(exc)
    return False


def sleep_load(p, threads: int, seconds: float, sql: str = "SELECT pg_sleep(0.1)") -> list:
    """`threads` clients looping `sql` for `seconds`; returns their errors."""
    errors: list = []
    stop = time.monotonic() + seconds

    def run() -> None:
        try:
            conn = connect(p)
            conn.autocommit = True
            with conn.cursor() as cur:
                while time.monotonic() < stop:
                    cur.execute(sql)
            conn.close()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
    ts = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 30)
    return errors


# -- global limits under load ------------------------------------------------------------------


def test_300_clients_4_workers_never_exceed_pool_size(pg, pooler_factory):
    clients, txs, pool_size = 300, 20, 10
    direct(pg, "DROP TABLE IF EXISTS pf_counters; "
               "CREATE TABLE pf_counters (id int PRIMARY KEY, n int NOT NULL DEFAULT 0); "
               f"INSERT INTO pf_counters SELECT g, 0 FROM generate_series(0, {clients - 1}) g")
    p = start(pooler_factory, prefork_config(pg, 4, pool_size))
    errors: list = []
    seen_workers: set[int] = set()

    def client(i: int) -> None:
        try:
            conn = connect(p, connect_timeout=60)
            with conn.cursor() as cur:
                for _ in range(txs):
                    cur.execute("UPDATE pf_counters SET n = n + 1 WHERE id = %s", (i,))
                    conn.commit()
            conn.close()
        except Exception as exc:  # noqa: BLE001
            errors.append((i, exc))

    def busy_workers() -> int:
        busy = {w["id"] for w in snapshot(p)["workers"] if w["clients"] > 0}
        seen_workers.update(busy)
        return len(busy)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    with Poller(lambda: backend_count(pg, APP_DB)) as servers, Poller(busy_workers, 0.1):
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, f"{len(errors)} client errors, first: {errors[0]!r}"
    rows = query_one(pg, "SELECT count(*), min(n), max(n), sum(n) FROM pf_counters")[0]
    assert rows == (clients, txs, txs, clients * txs)
    assert servers.max <= pool_size, f"backend saw {servers.max} servers for pool_size {pool_size}"
    assert servers.max >= 2
    assert len(seen_workers) >= 2, f"all clients landed on one worker: {seen_workers}"
    # Workers copy their counters into shared memory every 0.2 s.
    wait_until(lambda: snapshot(p)["pools"][f"{APP_DB}/{APP_USER}"]["xact_count"] >= clients * txs, 5)
    assert snapshot(p)["claims"][POOL_KEY] <= pool_size


def test_max_client_conn_counts_every_worker(pg, pooler_factory):
    p = start(pooler_factory, prefork_config(pg, 2, 2, max_client_conn=6))
    conns = [connect(p) for _ in range(6)]
    assert sum(w["clients"] for w in snapshot(p)["workers"]) == 6
    for _ in range(4):                                   # whichever worker takes it
        with pytest.raises(psycopg2.OperationalError, match="max_client_conn"):
            connect(p)
    conns.pop().close()
    wait_until(lambda: sum(w["clients"] for w in snapshot(p)["workers"]) == 5, 5)
    conns.append(connect(p))
    for c in conns:
        c.close()


def test_max_db_connections_across_pools_and_workers(pg, pooler_factory, app_userlist):
    """Two pools (users app and md5user) share max_db_connections 3: a waiter of one
    pool gets the idle server of the other, in either worker."""
    cfg = prefork_config(pg, 2, 10, auth={"type": "trust"})
    db = cfg["databases"][APP_DB]
    del db["user"], db["password"]                       # each client's own user; passwords from the userlist
    db["max_db_connections"] = 3
    p = pooler_factory(cfg, userlist=app_userlist)
    wait_until(lambda: len(re.findall(r"worker \d+ \(pid \d+\) started", p.log())) >= 2, 15)
    errors: list = []
    stop = time.monotonic() + 2.0

    def run(user: str) -> None:
        try:
            conn = p.connect(user=user, password=None)
            conn.autocommit = True
            with conn.cursor() as cur:
                while time.monotonic() < stop:
                    cur.execute("SELECT pg_sleep(0.05)")
            conn.close()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(u,), daemon=True)
               for u in ("app", "md5user") * 5]
    with Poller(lambda: backend_count(pg, APP_DB)) as servers:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    assert servers.max == 3, f"saw {servers.max} servers for max_db_connections 3"


def test_waiting_client_gets_idle_server_of_another_worker(pg, pooler_factory):
    """pool_size 1, 2 workers: the one server bounces between the workers, its socket
    moving with it (proc/servermove.py): every round runs on the same backend."""
    p = start(pooler_factory, prefork_config(pg, 2, 1, admin_users=["pgadmin"]))
    by_worker = spread_connections(p, 1, 2)
    a, b = by_worker[0][0], by_worker[1][0]
    latencies, pids = [], []
    for rnd in range(6):
        holder, waiter = (a, b) if rnd % 2 == 0 else (b, a)
        waiter_worker = 1 if rnd % 2 == 0 else 0
        with holder.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")         # BEGIN: holds the only server
            pids.append(cur.fetchone()[0])
        done: list[tuple[float, int]] = []

        def wait_for_server() -> None:
            with waiter.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                done.append((time.monotonic(), cur.fetchone()[0]))
            waiter.commit()
        t = threading.Thread(target=wait_for_server, daemon=True)
        t.start()
        wait_until(lambda: snapshot(p)["workers"][waiter_worker]["waiting"] >= 1, 5,
                   message="the second client never waited")
        t0 = time.monotonic()
        holder.commit()                                   # the server goes idle in the holder's worker
        t.join(5)
        assert done, "the waiting client was never served"
        latencies.append(done[0][0] - t0)
        pids.append(done[0][1])
    print(f"\nhand-off latency (s): {[round(x, 4) for x in latencies]} "
          f"median {statistics.median(latencies):.4f} max {max(latencies):.4f}")
    assert max(latencies) < 1.0, latencies
    assert len(set(pids)) == 1, f"a new backend served a round: {pids}"
    snap = snapshot(p)
    assert sum(w["handoffs_given"] for w in snap["workers"]) >= 6
    moved = [(w["servers_moved_out"], w["servers_moved_in"]) for w in snap["workers"]]
    assert sum(o for o, _ in moved) >= 6 and sum(i for _, i in moved) >= 6, moved
    assert snap["claims"][POOL_KEY] <= 1
    row = next(r for r in admin_show(p, "STATS", "pgadmin", None) if r["database"] == APP_DB)
    assert int(row["total_server_moved_in_count"]) >= 6, row
    assert "moved to worker" in p.log() and "taken over from another worker" in p.log()
    # A moved server leaves no entry in the sender's epoll set: one left there (epoll
    # keeps it while the receiver holds the socket) reports the socket's traffic under a
    # dead fd number, and libev then rebuilt its set and aborted the worker.
    for w in snap["workers"]:
        assert not stale_epoll_entries(w["pid"]), (w["pid"], stale_epoll_entries(w["pid"]))


def stale_epoll_entries(pid: int) -> list[str]:
    """Entries of process `pid`'s epoll sets whose fd no longer is the file they were
    registered for (closed, or the number reused)."""
    stale = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            info = open(f"/proc/{pid}/fdinfo/{fd}").read()
        except OSError:
            continue
        entries = re.findall(
            r"tfd:\s*(\d+)\s+events:\s*\S+\s+data:\s*([0-9a-f]+).*?ino:([0-9a-f]+)", info)
        # libev keeps a per-fd generation in the high half of the data, raised when an
        # fd number is used again; every fd raised at once, the listening sockets'
        # too, is libev having met events it could not place and rebuilt its whole
        # epoll set (the path that aborts a worker if some watcher's fd is closed).
        gens = [int(data, 16) >> 32 for _, data, _ in entries]
        if gens and min(gens) > 1:
            stale.append(f"libev rebuilt its epoll set (every fd at generation >= {min(gens)})")
        for tfd, _, ino in entries:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{tfd}")
            except OSError:
                stale.append(f"fd {tfd} (closed)")
                continue
            inode = re.search(r"\[(\d+)\]", target)
            if inode and int(inode.group(1)) != int(ino, 16):
                stale.append(f"fd {tfd} ({target}, registered for inode {int(ino, 16)})")
    return stale


def test_kill9_worker_respawns_and_gives_slots_back(pg, pooler_factory):
    pool_size = 4
    direct(pg, "DROP TABLE IF EXISTS pf_kill; CREATE TABLE pf_kill (id int PRIMARY KEY, n int); "
               "INSERT INTO pf_kill SELECT g, 0 FROM generate_series(0, 99) g")
    p = start(pooler_factory, prefork_config(pg, 2, pool_size))
    by_worker = spread_connections(p, 3, 2)
    clients = [(w, c) for w, conns in by_worker.items() for c in conns]
    errors: dict[int, list] = {i: [] for i in range(len(clients))}
    stop = threading.Event()

    def work(i: int, conn) -> None:
        with conn.cursor() as cur:
            while not stop.is_set():
                try:
                    cur.execute("UPDATE pf_kill SET n = n + 1 WHERE id = %s", (i,))
                    conn.commit()
                except Exception as exc:  # noqa: BLE001
                    errors[i].append(exc)
                    return
                time.sleep(0.005)
    threads = [threading.Thread(target=work, args=(i, c), daemon=True) for i, (_, c) in enumerate(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    before = snapshot(p)["workers"][0]
    assert before["servers"] > 0, "the victim held no server: the test would prove nothing"
    os.kill(before["pid"], signal.SIGKILL)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(10)
    for i, (w, _) in enumerate(clients):
        if w == 0:
            # Idle at the kill: taken over by the other worker (test_worker_crash_clients.py),
            # no error; in flight: told 08007 and closed (libpq reports no SQLSTATE).
            assert all(isinstance(e, psycopg2.OperationalError) for e in errors[i]), errors[i]
        else:
            assert not errors[i], f"client on surviving worker {w} saw {errors[i]!r}"
    wait_until(lambda: snapshot(p)["workers"][0]["pid"] not in (0, before["pid"]), 10,
               message="worker 0 was not respawned")
    p.wait_for_log(r"worker 0 was killed by SIGKILL; respawning")
    assert snapshot(p)["claims"][POOL_KEY] <= pool_size
    # The dead worker's claims are back: a burst reaches pool_size again, and no more.
    with Poller(lambda: backend_count(pg, APP_DB)) as servers:
        errs = sleep_load(p, 2 * pool_size, 1.5, "SELECT pg_sleep(0.3)")
    assert not errs, errs[:3]
    assert servers.max == pool_size, f"burst reached {servers.max} servers, pool_size {pool_size}"


def test_hung_worker_is_killed_and_replaced(pg, pooler_factory):
    """A worker whose loop stops (SIGSTOP here) misses its heartbeat: after 10 s the
    master kills it and starts another; the other worker serves throughout."""
    p = start(pooler_factory, prefork_config(pg, 2, 2))
    by_worker = spread_connections(p, 1, 2)
    survivor = by_worker[0][0]
    survivor.autocommit = True
    hung = snapshot(p)["workers"][1]["pid"]
    os.kill(hung, signal.SIGSTOP)
    t0 = time.monotonic()
    with survivor.cursor() as cur:
        while snapshot(p)["workers"][1]["pid"] in (0, hung):
            cur.execute("SELECT 1")                       # worker 0 is unaffected
            assert time.monotonic() - t0 < 20, "the hung worker was never replaced"
            time.sleep(0.2)
    took = time.monotonic() - t0
    p.wait_for_log(r"worker 1 \(pid %d\) has not run its loop for 1\ds: killing it" % hung)
    assert 9 < took < 15, took
    connect(p).close()


# -- cancel -----------------------------------------------------------------------------------------


def test_cancels_reach_queries_on_other_workers(pg, pooler_factory):
    n = 12
    p = start(pooler_factory, prefork_config(pg, 2, 2 * n))
    conns = [connect(p) for _ in range(n)]
    for c in conns:
        c.autocommit = True
    for rnd in range(2):
        outcome: list = [None] * n

        def run(i: int) -> None:
            try:
                with conns[i].cursor() as cur:
                    cur.execute("SELECT pg_sleep(5)")
                outcome[i] = ("finished", time.monotonic())
            except psycopg2.errors.QueryCanceled:
                outcome[i] = ("cancelled", time.monotonic())
            except Exception as exc:  # noqa: BLE001
                outcome[i] = (repr(exc), time.monotonic())
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        wait_until(lambda: query_one(pg, "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                         "AND query = 'SELECT pg_sleep(5)'")[0][0] == n, 10)
        sent = []
        for c in conns:
            sent.append(time.monotonic())
            c.cancel()                       # a new connection: any worker may take it
        for t in threads:
            t.join(10)
        for i in range(n):
            assert outcome[i] is not None and outcome[i][0] == "cancelled", outcome[i]
            assert outcome[i][1] - sent[i] < 1.0, f"cancel took {outcome[i][1] - sent[i]:.2f}s"
    workers = snapshot(p)["workers"]
    forwarded = sum(w["cancels_forwarded"] for w in workers)
    received = sum(w["cancels_received"] for w in workers)
    print(f"\ncancels forwarded between workers: {forwarded} of {2 * n}")
    assert forwarded >= 1, "no cancel landed on another worker (2^-24 odds): nothing tested"
    assert received == forwarded


# -- signals ----------------------------------------------------------------------------------------


def reload_gens(p) -> list[int]:
    return [w["config_gen"] for w in snapshot(p)["workers"]]


def test_sighup_reload_reaches_every_worker_and_bad_file_changes_nothing(pg, pooler_factory):
    p = start(pooler_factory, prefork_config(pg, 2, None, default_pool_size=2))
    with Poller(lambda: backend_count(pg, APP_DB)) as servers:
        assert not sleep_load(p, 8, 1.2)
    assert servers.max == 2
    p.update_config({"default_pool_size": 4})
    wait_until(lambda: reload_gens(p) == [1, 1], 10, message=f"not every worker reloaded:\n{p.log()}")
    with Poller(lambda: backend_count(pg, APP_DB)) as servers:
        assert not sleep_load(p, 8, 1.2)
    assert servers.max == 4
    text = p.config_path.read_text()
    p.config_path.write_text(text.replace("default_pool_size: 4", "default_pool_size: lots"))
    p.reload()
    p.wait_for_log(r"RELOAD failed, keeping the old config: default_pool_size: 'lots'")
    time.sleep(0.3)
    assert reload_gens(p) == [1, 1]
    assert snapshot(p)["config_gen"] == 1
    with Poller(lambda: backend_count(pg, APP_DB)) as servers:
        assert not sleep_load(p, 8, 1.2)
    assert servers.max == 4


def test_sigusr1_pauses_and_sigusr2_resumes_all_workers(pg, pooler_factory):
    p = start(pooler_factory, prefork_config(pg, 2, 2))
    by_worker = spread_connections(p, 2, 2)
    in_flight = by_worker[1][0]                               # worker 1 is killed later
    with in_flight.cursor() as cur:
        cur.execute("SELECT 1")                               # a transaction is open
    p.send_signal(signal.SIGUSR1)
    wait_until(lambda: snapshot(p)["paused"], 5)
    time.sleep(0.1)                                           # workers see the flag within a tick
    with in_flight.cursor() as cur:                           # ... and may finish
        cur.execute("SELECT 2")
    in_flight.commit()
    done: list = []

    def query(conn) -> None:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 3")
        done.append(conn)
    threads = [threading.Thread(target=query, args=(c,), daemon=True) for c in by_worker[0]]
    for t in threads:
        t.start()
    # A worker spawned during the pause starts paused.
    kill_and_await_respawn(p, 1)

    def fresh_client() -> None:
        # Its first login in the new worker needs a server (to learn its parameters).
        query(connect(p, connect_timeout=20))
    # Which worker accepts is the kernel's choice, and a loaded machine can
    # favour the old one for a while: add clients until one lands on the new
    # worker (bounded), rather than betting on a fixed number.
    fresh: list[threading.Thread] = []
    deadline = time.monotonic() + 15
    while snapshot(p)["workers"][1]["clients"] < 1 and len(fresh) < 40 and time.monotonic() < deadline:
        t = threading.Thread(target=fresh_client, daemon=True)
        t.start()
        fresh.append(t)
        time.sleep(0.1)
    wait_until(lambda: snapshot(p)["workers"][1]["clients"] >= 1, 5,
               message="no new client reached the respawned worker")
    time.sleep(1.0)
    assert not done, "a query ran while paused"
    wait_until(lambda: snapshot(p)["pools"][f"{APP_DB}/{APP_USER}"]["cl_waiting"] >= 2, 2)
    t0 = time.monotonic()
    p.send_signal(signal.SIGUSR2)
    for t in threads + fresh:
        t.join(10)
    print(f"\nresume served {len(done)} waiting clients in {time.monotonic() - t0:.3f}s")
    assert len(done) == len(threads) + len(fresh)


def test_single_worker_signals(pg, pooler_factory):
    """workers: 1 keeps the in-process path; the same signals work there."""
    p = pooler_factory(prefork_config(pg, 1, 2))
    p.wait_for_log(r"worker 0 listening")
    assert "started" not in p.log() and not os.path.exists(shm.default_path(p.pid))
    conn = connect(p)
    conn.autocommit = True
    p.send_signal(signal.SIGUSR1)
    p.wait_for_log("pausing all pools")
    done: list = []

    def query() -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        done.append(1)
    t = threading.Thread(target=query, daemon=True)
    t.start()
    time.sleep(0.5)
    assert not done
    p.send_signal(signal.SIGUSR2)
    t.join(5)
    assert done
    p.config_path.write_text("pool_mode: nonsense\n")
    p.reload()
    p.wait_for_log("RELOAD failed, keeping the old config")
    with conn.cursor() as cur:
        cur.execute("SELECT 42")
        assert cur.fetchone() == (42,)
    # SIGTERM as PgBouncer: stop listening, keep serving the connected client,
    # exit when it leaves.
    p.send_signal(signal.SIGTERM)
    p.wait_for_log("got SIGTERM, shutting down")
    wait_until(lambda: refused(p), 5, message="still accepting after SIGTERM")
    with conn.cursor() as cur:
        cur.execute("SELECT 43")
        assert cur.fetchone() == (43,)
    assert p.returncode is None
    conn.close()
    p.proc.wait(5)
    assert p.returncode == 0


# -- daemon, pidfile, user -----------------------------------------------------------------------------


def test_daemon_writes_pidfile_and_detaches(pg, tmp_path):
    port = free_port()
    pidfile, logfile = tmp_path / "pooler.pid", tmp_path / "pooler.log"
    cfg = prefork_config(pg, 2, 2, listen_addr="127.0.0.1", listen_port=port,
                         pidfile=str(pidfile), logfile=str(logfile))
    cfg_path = tmp_path / "pooler.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    rc = subprocess.run([sys.executable, "-m", "pooler", "-d", str(cfg_path)], env=env,
                        timeout=20, cwd=tmp_path).returncode
    assert rc == 0
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10))
    try:
        assert os.getsid(pid) != os.getsid(0), "the daemon left our session"
        assert os.getpgid(pid) != os.getpgid(0)
        wait_until(lambda: len(re.findall(r"worker \d+ \(pid \d+\) started", logfile.read_text())) >= 2, 15)
        conn = psycopg2.connect(host="127.0.0.1", port=port, dbname=APP_DB, user=APP_USER,
                                connect_timeout=10)
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        conn.close()
        out = subprocess.run([sys.executable, "-m", "pooler.proc.shm", "dump", str(pidfile)], env=env,
                             capture_output=True, text=True, timeout=10)
        dump = json.loads(out.stdout)
        assert dump["master_pid"] == pid and len(dump["workers"]) == 2
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10)
    assert not pidfile.exists()
    assert not os.path.exists(shm.default_path(pid))


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
def test_user_switch_after_bind(pg, pooler_factory):
    import pwd
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    try:
        probe = subprocess.run([sys.executable, "-c", "import gevent.monkey, gevent.events"],
                               user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
                               capture_output=True, cwd="/").returncode
    except OSError:
        probe = -1
    if probe != 0:
        pytest.skip("this Python installation is not readable by user nobody")
    p = pooler_factory(prefork_config(pg, 2, 2), extra_args=["-u", "nobody"])
    wait_until(lambda: len(re.findall(r"worker \d+ \(pid \d+\) started", p.log())) >= 2, 15)
    conn = connect(p)
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.close()
    for pid in [p.pid] + [w["pid"] for w in snapshot(p)["workers"]]:
        status = Path(f"/proc/{pid}/status").read_text()
        uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
        assert uid == nobody.pw_uid, f"pid {pid} runs as uid {uid}"


# -- the admin console spans every worker ----------------------------------------------------------


def test_admin_console_sees_and_commands_every_worker(pg, pooler_factory):
    p = start(pooler_factory, prefork_config(pg, 2, 2, admin_users=["pgadmin"]))
    by_worker = spread_connections(p, 3, 2)
    clients = [c for cs in by_worker.values() for c in cs]
    admin = psycopg2.connect(host=p.host, port=p.port, dbname="pgbouncer", user="pgadmin",
                             connect_timeout=10)
    admin.autocommit = True

    def show(what: str) -> list[dict]:
        with admin.cursor() as cur:
            cur.execute(f"SHOW {what}")
            cols = [d.name for d in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    def run(sql: str) -> None:
        with admin.cursor() as cur:
            cur.execute(sql)

    # The extra connections spread_connections closed take a moment to leave.
    wait_until(lambda: sum(1 for c in show("CLIENTS") if c["database"] == APP_DB) == len(clients),
               10, message="SHOW CLIENTS does not list exactly the open clients of every worker")
    pool = next(r for r in show("POOLS") if r["database"] == APP_DB)
    assert pool["cl_active"] == len(clients)
    # PAUSE from one worker's console holds the clients of both workers.
    run("PAUSE")
    assert snapshot(p)["paused"]
    done: list = []

    def query(conn) -> None:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        done.append(conn)
    threads = [threading.Thread(target=query, args=(cs[0],), daemon=True) for cs in by_worker.values()]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert not done
    run("RESUME")
    for t in threads:
        t.join(5)
    assert len(done) == 2
    # DISABLE reaches every worker: no login anywhere.
    run(f"DISABLE {APP_DB}")
    for _ in range(6):
        with pytest.raises(psycopg2.OperationalError):
            connect(p)
    run(f"ENABLE {APP_DB}")
    connect(p).close()
    # RELOAD goes through the master and reaches both workers before it returns.
    p.update_config({"default_pool_size": 3}, reload=False)
    run("RELOAD")
    assert reload_gens(p) == [1, 1]
    admin.close()


def test_min_pool_size_is_global_across_workers(pg, pooler_factory):
    """Two workers warm a forced-user database up to min_pool_size together,
    not each: the warm-up claims against the shared quota."""
    cfg = prefork_config(pg, 2, 5)
    cfg["databases"][APP_DB]["min_pool_size"] = 2
    with Poller(lambda: backend_count(pg, APP_DB), interval=0.02) as poll:
        start(pooler_factory, cfg)
        wait_until(lambda: backend_count(pg, APP_DB) == 2, 5,
                   message="min_pool_size servers were not opened")
        time.sleep(1.5)              # several janitor ticks in both workers
    assert poll.max == 2, f"{poll.max} servers opened ahead for min_pool_size 2 with 2 workers"


def test_idle_timeout_shrinks_to_global_min_pool_size(pg, pooler_factory):
    """After a burst, server_idle_timeout shrinks the pool to min_pool_size counted
    over every worker (a per-worker count would keep min_pool_size in each)."""
    cfg = prefork_config(pg, 2, 10, server_idle_timeout=0.5)
    cfg["databases"][APP_DB]["min_pool_size"] = 2
    p = start(pooler_factory, cfg)
    by_worker = spread_connections(p, 4, 2)

    def burst(conn) -> None:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_sleep(0.3)")
    run_threads(burst, [(c,) for cs in by_worker.values() for c in cs], timeout=30)
    assert backend_count(pg, APP_DB) >= 6, "the burst did not open servers in both workers"
    wait_until(lambda: backend_count(pg, APP_DB) == 2, 10,
               message="pool did not shrink to min_pool_size 2 over both workers")
    time.sleep(1.5)                  # and stays there: nobody refills or over-closes
    assert backend_count(pg, APP_DB) == 2


def test_console_set_holds_in_a_respawned_worker(pg, pooler_factory):
    """SET lives in memory (as in PgBouncer), so the master must keep it for the
    workers it spawns later: a respawned worker with the file's default_pool_size
    (20) would claim past the global cap of 2."""
    p = start(pooler_factory, prefork_config(pg, 2, None, admin_users=["pgadmin"]))
    admin = psycopg2.connect(host=p.host, port=p.port, dbname="pgbouncer", user="pgadmin",
                             connect_timeout=10)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SET default_pool_size = 2")
    admin.close()
    kill_and_await_respawn(p, 1)
    by_worker = spread_connections(p, 4, 2)
    conns = [c for cs in by_worker.values() for c in cs]

    def work(conn) -> None:
        conn.autocommit = True
        with conn.cursor() as cur:
            for _ in range(10):
                cur.execute("SELECT pg_sleep(0.05)")
    with Poller(lambda: backend_count(pg, APP_DB)) as servers:
        run_threads(work, [(c,) for c in conns], timeout=60)
    assert servers.max == 2, f"{servers.max} servers with a global pool_size of 2"
    assert snapshot(p)["pools"][f"{APP_DB}/{APP_USER}"]["pool_size"] == 2


def test_console_set_of_log_settings_applies_in_every_process(pg, pooler_factory, tmp_path):
    """logfile and log_format may be SET (as RELOAD may change them): the workers and
    the master all re-apply them, so every process writes to the new file."""
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    p = start(pooler_factory, prefork_config(pg, 2, 2, admin_users=["pgadmin"], logfile=str(first)))
    admin = psycopg2.connect(host=p.host, port=p.port, dbname="pgbouncer", user="pgadmin",
                             connect_timeout=10)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"SET logfile = '{second}'")
    admin.close()
    pids = [str(w["pid"]) for w in snapshot(p)["workers"]] + [str(p.pid)]
    wait_until(lambda: second.exists() and all(
        re.search(rf" {pid} INFO log settings reloaded", second.read_text()) for pid in pids), 10,
        message=f"not every process re-applied the log settings:\n{second.read_text()}"
        if second.exists() else "no new log file")


def test_logfile_follows_logrotate(pg, pooler_factory, tmp_path):
    """logrotate moves the file away (then sends SIGHUP, out of PgBouncer habit):
    every worker goes on writing to a new file at the configured path."""
    logfile = tmp_path / "pooler.log"
    p = start(pooler_factory, prefork_config(pg, 2, 2, logfile=str(logfile)))
    spread_connections(p, 1, 2)                       # both workers have logged already
    logfile.rename(tmp_path / "pooler.log.1")
    p.reload()
    wait_until(lambda: logfile.exists() and "config from" in logfile.read_text(), 10,
               message="the master did not reopen its log file")
    by_worker = spread_connections(p, 2, 2)           # new logins in both workers
    pids = {w["pid"] for w in snapshot(p)["workers"]}
    logged = {int(m) for m in re.findall(r"^\S+ \S+ (\d+) INFO C-\d+ .* login attempt", logfile.read_text(), re.M)}
    assert pids <= logged, f"workers {pids - logged} still write to the rotated file"
    for cs in by_worker.values():
        for c in cs:
            c.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_applies_log_settings(pg, pooler_factory, tmp_path, workers):
    """log_format (and logfile, verbose) changed by a reload take effect in every
    process: the next login lines are JSON, in the new file."""
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    p = pooler_factory(prefork_config(pg, workers, 2, logfile=str(first)))
    ready = r"worker \d+ \(pid \d+\) started" if workers > 1 else r"worker 0 listening"
    wait_until(lambda: len(re.findall(ready, first.read_text())) >= workers, 15)
    p.update_config({"log_format": "json", "logfile": str(second)})
    wait_until(lambda: second.exists() and "log settings reloaded" in second.read_text(), 10,
               message=f"no reload line in the new log file:\n{first.read_text()[-2000:]}")
    if workers > 1:
        wait_until(lambda: second.read_text().count("log settings reloaded") >= workers + 1, 10,
                   message="not every worker re-applied the log settings")
        by_worker = spread_connections(p, 2, workers)
        pids = {w["pid"] for w in snapshot(p)["workers"]}
    else:
        by_worker = {0: [connect(p) for _ in range(2)]}
        pids = {p.pid}
    logins = [json.loads(line) for line in second.read_text().splitlines()
              if line.startswith("{") and "login attempt" in line]
    assert pids <= {rec["pid"] for rec in logins}, f"text lines still: {second.read_text()[-1500:]}"
    assert "login attempt" not in first.read_text(), "a login was logged to the old file"
    for cs in by_worker.values():
        for c in cs:
            c.close()


def test_workers_survive_reload_and_pause_signals_sent_to_them(pg, pooler_factory):
    """`pkill -HUP pooler` signals the workers too: the master handles reload and
    pause, and a worker must not die of a signal it does not handle."""
    p = start(pooler_factory, prefork_config(pg, 2, 2))
    before = [w["pid"] for w in snapshot(p)["workers"]]
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        for pid in before:
            os.kill(pid, sig)
    time.sleep(1.0)
    assert [w["pid"] for w in snapshot(p)["workers"]] == before
    assert "was killed by" not in p.log()
    conn = connect(p)
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.close()


def test_a_worker_busy_with_its_own_queue_does_not_starve_another(pg, pooler_factory,
                                                                 real_threads):
    """Worker 0's three clients keep pool_size 2 busy and always queue, so each server
    it releases goes straight to its own next client; it never has a spare idle one.
    A client of the same pool in worker 1 must still get a server (an equal share is
    given back: peers._share_fairly), instead of waiting until worker 0's load stops."""
    p = start(pooler_factory, prefork_config(pg, 2, 2))
    by_worker = spread_connections(p, 3, 2, limit=400)
    stop = threading.Event()
    errors: list[str] = []

    def busy(conn) -> None:
        try:
            while not stop.is_set():
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_sleep(0.01)")
                conn.commit()
        except psycopg2.Error as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=busy, args=(c,), daemon=True) for c in by_worker[0]]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)          # worker 0 now holds both servers with a queue behind them
        other = by_worker[1][0]
        got: list = []

        def served() -> None:
            with other.cursor() as cur:
                cur.execute("SELECT 'served'")
                got.append(cur.fetchone()[0])
            other.commit()
        t = threading.Thread(target=served, daemon=True)
        t0 = time.monotonic()
        t.start()
        t.join(15)
        assert got == ["served"], \
            f"worker 1's client not served in {time.monotonic() - t0:.1f}s while worker 0 was busy"
    finally:
        stop.set()
        for th in threads:
            th.join(5)
    assert not errors, errors[:3]
