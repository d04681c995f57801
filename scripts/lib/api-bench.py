#!/usr/bin/env python3
"""huskd API benchmark (scripts/bench --only api): prints a markdown table.

Usage: api-bench.py SOCKET PROTO_DIR RUNS
Rows: CreateVm(start) of a sandbox until its guest agent answers; CreateVm(start) of `true`
until the VM is STOPPED; Exec round trip of `true`; CreateVm rate with N concurrent clients;
huskd's resident memory with 0, 10 and 50 VMs (started sandboxes of 64 MiB).
"""
import concurrent.futures
import statistics
import sys
import time

import husk_grpc


def main():
    socket, proto_dir, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pb, rpc, grpc = husk_grpc.load(proto_dir)

    def client():
        return husk_grpc.client(grpc, rpc, socket)

    husk = client()

    def wait(name, done, limit=180):
        end = time.time() + limit
        while time.time() < end:
            vm = husk.GetVm(pb.GetVmRequest(vm=name))
            if done(vm):
                return
            time.sleep(0.005)
        raise SystemExit(f"{name}: not done within {limit} s")

    def ms(xs):
        xs = sorted(xs)
        return f"{statistics.median(xs):.1f} | {xs[int(len(xs) * 0.9) - 1 if len(xs) >= 10 else -1]:.1f}"

    def rss_kib(pid):
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    rows = []
    ready, app = [], []
    for i in range(runs):
        t = time.perf_counter()
        husk.CreateVm(pb.CreateVmRequest(spec=pb.VmSpec(name=f"s{i}", memory_mib=128), start=True))
        wait(f"s{i}", lambda vm: vm.status.agent_ready)
        ready.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        husk.CreateVm(pb.CreateVmRequest(spec=pb.VmSpec(name=f"a{i}", memory_mib=128, command=["true"]), start=True))
        wait(f"a{i}", lambda vm: vm.state == pb.VM_STATE_STOPPED)
        app.append((time.perf_counter() - t) * 1000)
        husk.DeleteVm(pb.DeleteVmRequest(vm=f"a{i}", force=True))
        if i:
            husk.DeleteVm(pb.DeleteVmRequest(vm=f"s{i}", force=True))
    rows.append(("CreateVm+StartVm to guest agent ready (sandbox)", ms(ready), "ms"))
    rows.append(("CreateVm+StartVm of `true` to STOPPED (boot, run, exit)", ms(app), "ms"))

    rtts = []
    for _ in range(runs * 3):
        t = time.perf_counter()
        reqs = [pb.ExecRequest(start=pb.ExecStart(vm="s0", command=["true"])), pb.ExecRequest(close_stdin=True)]
        for reply in husk.Exec(iter(reqs)):
            if reply.WhichOneof("msg") == "exit":
                break
        rtts.append((time.perf_counter() - t) * 1000)
    rows.append(("Exec round trip of `true`", ms(rtts), "ms"))
    husk.DeleteVm(pb.DeleteVmRequest(vm="s0", force=True))

    for clients in (1, 4, 16):
        total = 64 if clients < 16 else 128
        stubs_ = [client() for _ in range(clients)]
        t = time.perf_counter()

        def create(i):
            stubs_[i % clients].CreateVm(pb.CreateVmRequest(spec=pb.VmSpec(name=f"c{clients}-{i}")))

        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(create, range(total)))
        rate = total / (time.perf_counter() - t)
        rows.append((f"CreateVm rate, {clients} concurrent client(s)", f"{rate:.0f} |", "VMs/s"))
        for vm in husk.ListVms(pb.ListVmsRequest()).vms:
            husk.DeleteVm(pb.DeleteVmRequest(vm=vm.id, force=True))

    pid = int(open(sys.argv[4]).read()) if len(sys.argv) > 4 else None
    if pid:
        started = 0
        for target in (0, 10, 50):
            while started < target:
                husk.CreateVm(pb.CreateVmRequest(spec=pb.VmSpec(name=f"m{started}", memory_mib=64), start=True))
                started += 1
            time.sleep(2)
            rows.append((f"huskd resident memory, {target} running VMs", f"{rss_kib(pid) / 1024:.1f} |", "MiB"))
        for vm in husk.ListVms(pb.ListVmsRequest()).vms:
            husk.DeleteVm(pb.DeleteVmRequest(vm=vm.id, force=True))

    print(f"## api: huskd over its Unix socket (Python grpcio client, {runs} runs; median | p90)")
    print()
    print("| measure | median | p90 | unit |")
    print("|---|---|---|---|")
    for name, value, unit in rows:
        print(f"| {name} | {value} | {unit} |")
    print()


if __name__ == "__main__":
    main()
