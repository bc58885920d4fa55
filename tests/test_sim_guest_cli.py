"""The simulated guest through the product's CLI: `xenblk sim host`, `xenblk serve --sim`,
`xenblk attach`, then `xenblk sim guest` with each ring shape the acceptance names."""

from __future__ import annotations

import subprocess

import pytest

from tests.fixtures.e2e import Stack, stop


@pytest.mark.parametrize("abi", ["x86_64-abi", "x86_32-abi"])
def test_guest_through_xenblk_serve(stack: Stack, abi: str) -> None:
    raw, qcow = stack.images / "a.raw", stack.images / "b.qcow2"
    subprocess.run(["truncate", "-s", "32M", str(raw)], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "32M"], check=True)
    stack.attach(3, str(raw), "xvdb")
    stack.attach(3, f"qcow2:{qcow}", "xvdc")
    for shape in (["--ring-order", "0", "--queues", "1"], ["--ring-order", "4", "--queues", "4", "--indirect"]):
        rc, result = stack.guest(3, "--abi", abi, "--rw", "randrw", "--bs", "16k", "--iodepth", "8", "--size", "8M",
                                 "--verify", "--seed", "21", *shape)  # fmt: skip
        assert rc == 0, f"{result}\n{stack.log_tail()}"
        assert isinstance(result, dict) and result["ok"] is True
        assert [d["vdev"] for d in result["disks"]] == ["xvdb", "xvdc"]
        for d in result["disks"]:
            n = d["negotiated"]
            assert n["protocol"] == abi
            assert n["ring_pages"] == (16 if "--indirect" in shape else 1)
            assert n["queues"] == (4 if "--indirect" in shape else 1)
            assert n["indirect_segments"] == (256 if "--indirect" in shape else 0)
            assert d["ios"] == 512 and d["errors"] == 0 and d["verify_errors"] == 0 and d["verified_reads"] > 0
    # Written once with a seed, read back verified by a later guest run on the same disks.
    rc, result = stack.guest(3, "--rw", "write", "--bs", "1M", "--iodepth", "4", "--seed", "8")
    assert rc == 0, result
    rc, result = stack.guest(3, "--rw", "randread", "--bs", "4k", "--iodepth", "16", "--verify", "--seed", "8",
                             "--abi", abi, "--queues", "2")  # fmt: skip
    assert rc == 0, result
    assert isinstance(result, dict)
    assert all(d["verified_reads"] == 8192 for d in result["disks"])
    assert stop(stack.serve) == 0, stack.log_tail()
    assert subprocess.run(["qemu-img", "check", "-q", str(qcow)]).returncode == 0
