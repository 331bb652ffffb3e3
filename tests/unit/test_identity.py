import pytest

from kvmfleet.identity import parse_identity, split_qemu_opts


@pytest.mark.parametrize("argv,expected", [
    (["/usr/bin/qemu-system-x86_64", "-name", "guest=web01,debug-threads=on", "-uuid",
      "8a3c1f9e-0000-4000-8000-000000000001"], ("qemu", "web01", "8a3c1f9e-0000-4000-8000-000000000001")),
    (["qemu-kvm", "-name", "db,,primary,process=qemu:db"], ("qemu", "db,primary", None)),
    (["qemu-system-x86_64", "-name", "guest=a,,b,debug-threads=on"], ("qemu", "a,b", None)),
    (["qemu-system-x86_64", "-name", "first", "-name", "guest=second"], ("qemu", "second", None)),
    (["qemu-system-x86_64", "-m", "64"], ("qemu", "qemu-system-x86-77", None)),
    (["/usr/bin/firecracker", "--id", "fc-7", "--api-sock", "/run/fc.sock"], ("firecracker", "fc-7", None)),
    (["firecracker", "--id=fc-8"], ("firecracker", "fc-8", None)),
    (["cloud-hypervisor", "--api-socket", "path=/run/ch/vm42.sock"], ("cloud-hypervisor", "vm42", None)),
    (["/usr/bin/python3", "-m", "kvmfleet.guestvmm", "vm", "-name", "guest=g1", "-uuid", "u-1"],
     ("kvmfleet-guestvmm", "g1", "u-1")),
    (["./myvmm"], ("myvmm", "myvmm-77", None)),
    ([], ("unknown", "vmm-77", None)),
])
def test_parse_identity(argv, expected):
    comm = {"qemu-system-x86_64": "qemu-system-x86", "./myvmm": "myvmm"}.get(argv[0] if argv else "", "")
    assert parse_identity(argv, comm, 77) == expected


def test_split_qemu_opts():
    assert split_qemu_opts("a,,b,c=d,,,e") == ["a,b", "c=d,", "e"]
    assert split_qemu_opts("") == [""]
