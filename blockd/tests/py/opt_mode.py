#!/usr/bin/python3
"""The handshake driven option by option through libnbd's opt mode: errors for unknown
exports must leave the negotiation going, and the export can still be entered afterwards.

Usage: opt_mode.py URI EXPORT
URI is any nbd:// URI of the server (its export name is replaced); EXPORT exists.

Prints one line per check and "all checks passed" at the end; exits 1 on any failure.
"""

import errno
import sys

import nbd

failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL", msg)


def check(cond, msg):
    if cond:
        print("ok  ", msg)
    else:
        fail(msg)


def opt_handle(uri):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_uri(uri)
    return h


def expect_opt_error(h, what, want, fn):
    try:
        fn()
    except nbd.Error as e:
        check(e.errnum == want,
              f"{what}: {errno.errorcode.get(e.errnum, e.errnum)} "
              f"(expected {errno.errorcode[want]})")
    else:
        fail(f"{what}: succeeded, expected {errno.errorcode[want]}")
    check(h.aio_is_negotiating(), f"{what}: negotiation continues")


def main():
    uri, export = sys.argv[1], sys.argv[2]

    # LIST, INFO and LIST_META_CONTEXT, errors in between, then GO.
    h = opt_handle(uri)
    check(h.aio_is_negotiating(), "opt mode stops in negotiation")
    names = []
    count = h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
    check(count == len(names) and export in [n for n, _ in names],
          f"opt_list lists {export}: {names}")
    check(all(d for _, d in names), "every export has a description")

    h.set_export_name("no-such-export")
    expect_opt_error(h, "opt_info on an unknown export", errno.ENOENT, h.opt_info)
    expect_opt_error(h, "opt_go on an unknown export", errno.ENOENT, h.opt_go)
    # ERR_UNKNOWN for LIST_META_CONTEXT makes libnbd report no contexts or an error.
    try:
        contexts = []
        n = h.opt_list_meta_context(lambda c: contexts.append(c) or 0)
        check(n == 0 and not contexts, "opt_list_meta_context on an unknown export lists nothing")
    except nbd.Error as e:
        print(f"ok   opt_list_meta_context on an unknown export: {e.string}")
    check(h.aio_is_negotiating(), "negotiation continues after meta context errors")

    h.set_export_name(export)
    h.opt_info()
    check(h.get_size() > 0, f"opt_info after errors: size {h.get_size()}")
    check(not h.is_read_only(), "opt_info reports the export writable")
    desc = h.get_export_description()
    check(bool(desc), f"opt_info reports the description {desc!r}")
    check(h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * 1024 * 1024, "maximum block size 32 MiB")
    contexts = []
    n = h.opt_list_meta_context(lambda c: contexts.append(c) or 0)
    check(n == len(contexts) and nbd.CONTEXT_BASE_ALLOCATION in contexts,
          f"opt_list_meta_context offers base:allocation: {contexts}")
    h.add_meta_context("qemu:dirty-bitmap:nothing")
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    contexts = []
    h.opt_list_meta_context(lambda c: contexts.append(c) or 0)
    check(contexts == [nbd.CONTEXT_BASE_ALLOCATION],
          f"only known contexts are listed for specific queries: {contexts}")
    check(h.aio_is_negotiating(), "still negotiating before GO")
    h.opt_go()
    check(h.aio_is_ready(), "opt_go enters transmission")
    check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation selected by GO")
    check(not h.can_meta_context("qemu:dirty-bitmap:nothing"), "unknown context not selected")
    h.pwrite(b"opt" * 100, 0)
    check(h.pread(300, 0) == b"opt" * 100, "I/O works after the opt-mode handshake")
    h.shutdown()

    # ABORT: the server acknowledges and the handle ends up closed.
    h = opt_handle(uri)
    h.opt_list(lambda name, desc: 0)
    h.opt_abort()
    check(h.aio_is_closed(), "opt_abort closes the connection")
    try:
        h.pread(512, 0)
        fail("I/O after opt_abort succeeded")
    except nbd.Error:
        print("ok   I/O after opt_abort is refused")

    # A plain connection still works: nothing above upset the server.
    h = nbd.NBD()
    h.connect_uri(uri)
    check(h.pread(300, 0) == b"opt" * 100, "a new connection sees the data")
    h.shutdown()


main()
if failures:
    print(f"{len(failures)} check(s) failed:")
    for f in failures:
        print("  " + f)
    sys.exit(1)
print("all checks passed")
