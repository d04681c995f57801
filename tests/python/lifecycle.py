#!/usr/bin/env python3
"""A non-Rust gRPC client of huskd: Python grpcio with stubs generated from proto/ at run time.

Drives a full VM lifecycle and checks every answer; exits non-zero with a message on the first
mismatch. Usage: lifecycle.py unix:///path/to/huskd.sock PROTO_DIR
"""
import os
import queue
import sys
import tempfile
import time


def generate_stubs(proto_dir, out_dir):
    from grpc_tools import protoc
    import importlib.resources
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    args = ["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", "husk/v1/husk.proto"]
    if protoc.main(args) != 0:
        sys.exit("protoc failed on husk/v1/husk.proto")
    sys.path.insert(0, out_dir)


def main():
    target, proto_dir = sys.argv[1], sys.argv[2]
    out_dir = tempfile.mkdtemp(prefix="husk-py-")
    generate_stubs(proto_dir, out_dir)
    import grpc
    from husk.v1 import husk_pb2 as pb, husk_pb2_grpc as rpc

    # grpcio sends the socket path as :authority on unix: targets, which is not a valid
    # authority and HTTP/2 servers (hyper, under tonic) reset the stream: name a plain one.
    channel = grpc.insecure_channel(target, options=[("grpc.default_authority", "localhost")])
    husk = rpc.HuskStub(channel)

    def expect(cond, what):
        if not cond:
            sys.exit(f"FAIL: {what}")
        print(f"ok: {what}", flush=True)

    try:
        husk.GetVm(pb.GetVmRequest(vm="no-such-vm"))
        expect(False, "GetVm of an unknown VM fails")
    except grpc.RpcError as e:
        expect(e.code() == grpc.StatusCode.NOT_FOUND, f"unknown VM is NOT_FOUND ({e.code()})")
    try:
        husk.CreateVm(pb.CreateVmRequest(spec=pb.VmSpec(name="py", vcpus=99)))
        expect(False, "vcpus=99 is refused")
    except grpc.RpcError as e:
        expect(e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"vcpus=99 is INVALID_ARGUMENT ({e.code()})")

    spec = pb.VmSpec(name="py", memory_mib=128, labels={"client": "python"})
    vm = husk.CreateVm(pb.CreateVmRequest(spec=spec, start=True))
    expect(vm.state == pb.VM_STATE_RUNNING, "CreateVm(start) returns a RUNNING VM")
    deadline = time.time() + 120
    while not husk.GetVm(pb.GetVmRequest(vm="py")).status.agent_ready:
        if time.time() > deadline:
            sys.exit("FAIL: the guest agent did not become ready in 120 s")
        time.sleep(0.1)
    expect(True, "the guest agent is ready")

    listed = husk.ListVms(pb.ListVmsRequest(label_selector={"client": "python"})).vms
    expect([v.id for v in listed] == [vm.id], "ListVms filters by label")

    requests = queue.Queue()
    requests.put(pb.ExecRequest(start=pb.ExecStart(vm="py", command=["sh", "-c", "read x; echo py-$x; exit 9"])))
    requests.put(pb.ExecRequest(stdin=b"stdin-works\n"))
    requests.put(pb.ExecRequest(close_stdin=True))
    requests.put(None)
    out, code = b"", None
    for reply in husk.Exec(iter(requests.get, None)):
        kind = reply.WhichOneof("msg")
        if kind == "stdout":
            out += reply.stdout
        elif kind == "exit":
            code = reply.exit.code
    expect(out == b"py-stdin-works\n", f"Exec streams stdin and stdout ({out!r})")
    expect(code == 9, f"Exec reports the exit code ({code})")

    expect(husk.PauseVm(pb.PauseVmRequest(vm="py")).state == pb.VM_STATE_PAUSED, "PauseVm")
    expect(husk.ResumeVm(pb.ResumeVmRequest(vm="py")).state == pb.VM_STATE_RUNNING, "ResumeVm")
    stopped = husk.StopVm(pb.StopVmRequest(vm="py", timeout_ms=20000))
    expect(stopped.state == pb.VM_STATE_STOPPED, f"StopVm gives STOPPED ({stopped.state})")
    try:
        husk.StopVm(pb.StopVmRequest(vm="py"))
        expect(False, "a second StopVm fails")
    except grpc.RpcError as e:
        expect(e.code() == grpc.StatusCode.FAILED_PRECONDITION, "a second StopVm is FAILED_PRECONDITION")
    husk.DeleteVm(pb.DeleteVmRequest(vm="py"))
    expect(len(husk.ListVms(pb.ListVmsRequest()).vms) == 0, "DeleteVm removes it")
    print("PYTHON-LIFECYCLE-OK")


if __name__ == "__main__":
    main()
