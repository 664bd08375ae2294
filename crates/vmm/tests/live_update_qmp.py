#!/usr/bin/env python3
"""A whole local live update of baton-vmm, driven through QEMU's own QMP library.

Usage: live_update_qmp.py SOURCE_QMP DESTINATION_QMP MIGRATION_URI [--defer]

SOURCE_QMP is the QMP socket of a running `baton-vmm --kernel ...`; DESTINATION_QMP
the one of `baton-vmm --incoming MIGRATION_URI` with the same --memory and --cpus, or,
with --defer, of `baton-vmm --incoming defer`: then the destination gets its
capabilities first and `migrate-incoming MIGRATION_URI` after, QEMU's documented way
to configure an incoming migration.
Uses `qemu.qmp` (PyPI, `python3 -m pip install qemu.qmp==0.0.6`): the asyncio
`QMPClient` on both sockets at once, then the synchronous `legacy.QEMUMonitorProtocol`
on the destination afterwards.

Steps: both sides answer `query-status` (running / inmigrate); capability
`x-ignore-shared` is set on both with `migrate-set-capabilities` and read back with
`query-migrate-capabilities`; `migrate` on the source; the source's MIGRATION events
run up to `completed` (and `query-migrate` says so with a `downtime`, unless the
source already exited, which it does once the destination runs); the destination's
MIGRATION events reach `completed`, a RESUME follows, and `query-status` is `running`.

Prints one `live_update_qmp: KEY=VALUE ...` summary line and exits 0; a failed check
exits 1 naming what was expected and what came back. Run by the Rust test
`qmp_python` (crates/vmm/tests/qmp_python.rs), which checks the guest's own output.
"""

import asyncio
import sys

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

TIMEOUT = 30.0


class Failed(Exception):
    pass


def check(what, cond, detail=""):
    if not cond:
        raise Failed(f"{what}: {detail}")


async def until_status(listener, want, side):
    """MIGRATION events from `listener` until one has a status in `want`."""
    seen = []
    while True:
        event = await asyncio.wait_for(listener.get(), TIMEOUT)
        status = event["data"]["status"]
        seen.append(status)
        if status in want:
            return status, seen
        check(f"{side}: MIGRATION status", status not in ("failed", "cancelled"),
              f"{seen}")


async def set_local(qmp, side):
    caps = [{"capability": "x-ignore-shared", "state": True}]
    ret = await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
    check(f"{side}: migrate-set-capabilities returns {{}}", ret == {}, repr(ret))
    got = await qmp.execute("query-migrate-capabilities")
    states = {c["capability"]: c["state"] for c in got}
    check(f"{side}: x-ignore-shared reads back on", states.get("x-ignore-shared") is True,
          repr(got))


async def main(src_path, dst_path, uri, defer):
    src = QMPClient("live-update-source")
    dst = QMPClient("live-update-destination")
    await asyncio.wait_for(src.connect(src_path), TIMEOUT)
    await asyncio.wait_for(dst.connect(dst_path), TIMEOUT)
    for qmp, side in ((src, "source"), (dst, "destination")):
        package = str(qmp.greeting.QMP.version["package"])
        check(f"{side}: greeting names baton", package.startswith("baton"), package)

    status = await src.execute("query-status")
    check("source: query-status", status["status"] == "running" and status["running"],
          repr(status))
    status = await dst.execute("query-status")
    check("destination: query-status", status["status"] == "inmigrate"
          and not status["running"], repr(status))

    await set_local(src, "source")
    await set_local(dst, "destination")
    if defer:
        ret = await dst.execute("migrate-incoming", {"uri": uri})
        check("destination: migrate-incoming returns {}", ret == {}, repr(ret))
        status = await dst.execute("query-status")
        check("destination: query-status after migrate-incoming",
              status["status"] == "inmigrate", repr(status))

    src_events = EventListener("MIGRATION")
    dst_events = EventListener(("MIGRATION", "RESUME"))
    src.register_listener(src_events)
    dst.register_listener(dst_events)

    ret = await src.execute("migrate", {"uri": uri})
    check("source: migrate returns {}", ret == {}, repr(ret))

    status, src_seen = await until_status(src_events, ("completed",), "source")
    downtime = None
    try:
        info = await asyncio.wait_for(src.execute("query-migrate"), TIMEOUT)
        check("source: query-migrate status", info.get("status") == "completed", repr(info))
        check("source: query-migrate downtime", isinstance(info.get("downtime"), int),
              repr(info))
        downtime = info["downtime"]
    except ExecuteError:
        raise
    except (QMPError, EOFError, OSError) as err:
        # The source exits as soon as the destination runs; its event already said
        # `completed`, and the Rust side checks that it exited successfully.
        print(f"live_update_qmp: source gone before query-migrate ({err!r})")

    dst_seen = []
    resumed = False
    while "completed" not in dst_seen or not resumed:
        event = await asyncio.wait_for(dst_events.get(), TIMEOUT)
        if event["event"] == "RESUME":
            resumed = True
            continue
        status = event["data"]["status"]
        dst_seen.append(status)
        check("destination: MIGRATION status", status not in ("failed", "cancelled"),
              repr(dst_seen))
    status = await dst.execute("query-status")
    check("destination: query-status after the update",
          status["status"] == "running" and status["running"], repr(status))

    src.remove_listener(src_events)
    dst.remove_listener(dst_events)
    try:
        await src.disconnect()
    except (QMPError, EOFError, OSError) as err:
        # The source may already be gone (it exits once the destination runs).
        print(f"live_update_qmp: source disconnect: {err!r}")
    await dst.disconnect()

    print("live_update_qmp: async API ok source_events=" + ",".join(src_seen)
          + " destination_events=" + ",".join(dst_seen)
          + f" query_migrate_downtime_ms={downtime}")


def legacy_check(dst_path):
    """QEMU's own test scripts use the synchronous API: it sees the same running VM."""
    legacy = QEMUMonitorProtocol(dst_path)
    legacy.connect()
    try:
        reply = legacy.cmd("query-status")
        # qemu.qmp 0.0.x returns the value; older scripts' copies the whole message.
        status = reply.get("return", reply) if isinstance(reply, dict) else reply
        check("destination (legacy API): query-status",
              isinstance(status, dict) and status.get("status") == "running", repr(reply))
    finally:
        legacy.close()
    print("live_update_qmp: legacy API ok")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--defer"]
    if len(args) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    try:
        asyncio.run(main(*args, defer="--defer" in sys.argv[1:]))
        # Outside the event loop: the legacy API runs its own.
        legacy_check(args[1])
    except Failed as err:
        print(f"live_update_qmp: FAILED: {err}", file=sys.stderr)
        sys.exit(1)
    except asyncio.TimeoutError:
        print(f"live_update_qmp: FAILED: no answer or event within {TIMEOUT} s",
              file=sys.stderr)
        sys.exit(1)
