#!/usr/bin/env python3
"""Drive a baton QMP server with QEMU's own client library, `qemu.qmp`.

Usage: qmp_client.py SOCKET_PATH

The server must run the demo VM (`baton_qmp::demo`), freshly started and running.
Both of qemu.qmp's APIs are used: the synchronous `legacy.QEMUMonitorProtocol` that
QEMU's own test scripts use, then two asyncio `QMPClient`s connected at the same time. Exits 0 after printing "N passed, 0 failed"; any failed check exits 1 with
what was expected and what came back.

Run by the Rust test `python_qmp` (crates/qmp/tests/python_qmp.rs).
"""

import asyncio
import sys

from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

TIMEOUT = 10.0
passed = 0


def check(what, cond, detail=""):
    global passed
    if not cond:
        print(f"FAILED: {what} {detail}", file=sys.stderr)
        sys.exit(1)
    passed += 1


async def expect_error(qmp, cmd, args, klass, desc):
    try:
        ret = await qmp.execute(cmd, args)
    except ExecuteError as err:
        check(f"{cmd} error class", err.error_class == klass, repr(err.error_class))
        check(f"{cmd} error desc", str(err) == desc, repr(str(err)))
        return
    check(f"{cmd} fails", False, f"returned {ret!r}")


async def next_event(listener, name):
    event = await asyncio.wait_for(listener.get(), TIMEOUT)
    check(f"event {name}", event["event"] == name, repr(dict(event)))
    check(f"event {name} timestamp", set(event["timestamp"]) == {"seconds", "microseconds"},
          repr(dict(event)))
    return event


async def main(path):
    qmp = QMPClient("baton-interop")
    await asyncio.wait_for(qmp.connect(path), TIMEOUT)

    greeting = qmp.greeting
    check("greeting", greeting is not None)
    version = greeting.QMP.version
    check("greeting version", set(version["qemu"]) == {"major", "minor", "micro"},
          repr(version))
    check("greeting package", str(version["package"]).startswith("baton"), repr(version))

    status = await qmp.execute("query-status")
    check("query-status running", status == {"running": True, "singlestep": False,
                                              "status": "running"}, repr(status))

    # A second client connected at the same time.
    other = QMPClient("baton-interop-2")
    await asyncio.wait_for(other.connect(path), TIMEOUT)
    other_listener = EventListener()
    other.register_listener(other_listener)

    listener = EventListener()
    with qmp.listen(listener):
        ret = await qmp.execute("stop")
        check("stop returns {}", ret == {}, repr(ret))
        await next_event(listener, "STOP")

        status = await qmp.execute("query-status")
        check("query-status paused", status["status"] == "paused" and not status["running"],
              repr(status))

        # The other client got the same STOP.
        await next_event(other_listener, "STOP")

        await expect_error(qmp, "migrate", {}, "GenericError", "Parameter 'uri' is missing")
        await expect_error(qmp, "migrate", {"uri": 5}, "GenericError",
                           "Invalid parameter type for 'uri', expected: string")
        await expect_error(qmp, "no-such-command", None, "CommandNotFound",
                           "The command no-such-command has not been found")
        await expect_error(qmp, "device-list-properties", {"typename": "nope"},
                           "DeviceNotFound", "Device 'nope' not found")

        await qmp.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": "events", "state": True}]})
        await qmp.execute("migrate-set-parameters", {"downtime-limit": 100})
        params = await qmp.execute("query-migrate-parameters")
        check("downtime-limit", params.get("downtime-limit") == 100, repr(params))

        ret = await qmp.execute("cont")
        await next_event(listener, "RESUME")
        ret = await qmp.execute("migrate", {"uri": "unix:/nonexistent"})
        check("migrate returns {}", ret == {}, repr(ret))
        for status in ("setup", "active"):
            event = await next_event(listener, "MIGRATION")
            check(f"MIGRATION {status}", event["data"] == {"status": status}, repr(dict(event)))
        await next_event(listener, "STOP")
        event = await next_event(listener, "MIGRATION")
        check("MIGRATION completed", event["data"] == {"status": "completed"},
              repr(dict(event)))

    info = await qmp.execute("query-migrate")
    check("query-migrate", info["status"] == "completed" and "ram" in info, repr(info))
    commands = {c["name"] for c in await qmp.execute("query-commands")}
    check("query-commands", {"query-status", "stop", "migrate", "qmp_capabilities"} <= commands,
          repr(commands))

    other.remove_listener(other_listener)
    await other.disconnect()
    ret = await qmp.execute("quit")
    check("quit returns {}", ret == {}, repr(ret))
    await qmp.disconnect()
    print(f"qemu.qmp: {passed} passed, 0 failed")


def legacy_phase(path):
    """The synchronous API, as QEMU's iotests and scripts use it."""
    legacy = QEMUMonitorProtocol(path)
    legacy.settimeout(TIMEOUT)
    greeting = legacy.connect(negotiate=True)
    check("legacy greeting", "QMP" in greeting, repr(greeting))
    check("legacy query-status", legacy.cmd("query-status")["status"] == "running")
    reply = legacy.cmd_raw("migrate", {"uri": True})
    check("legacy raw error", reply.get("error") == {
        "class": "GenericError",
        "desc": "Invalid parameter type for 'uri', expected: string"}, repr(reply))
    try:
        legacy.cmd("stop", now=True)
        check("legacy cmd raises", False)
    except ExecuteError as err:
        check("legacy unexpected parameter", str(err) == "Parameter 'now' is unexpected",
              repr(str(err)))
    legacy.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    legacy_phase(sys.argv[1])
    asyncio.run(main(sys.argv[1]))
