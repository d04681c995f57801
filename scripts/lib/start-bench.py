#!/usr/bin/env python3
"""Start latency through huskd (scripts/bench --only start): prints a markdown table.

Usage: start-bench.py SOCKET PROTO_DIR RUNS

"API call to ready sandbox": the time from a CreateVm call until the sandbox's guest agent
answers, by the path the sandbox takes:
- cold boot: CreateVm(start) of a sandbox, then GetVm until agent_ready;
- template clone: CreateVm(template) (docs/templates.md), which returns only once the clone
  has taken its new identity (agent_ready is true in its answer).
For 128 MiB, 1 GiB and 4 GiB guests, with 0 and 10 sandboxes already running, and clones per
second with 8 and 32 concurrent CreateVm(template) calls. The templates are built first
(CreateTemplate); their build time is printed too.
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

    def wait_ready(name, limit=300):
        """True once the agent answers; False if the VM failed first (the testbed's nested
        emulation occasionally triple-faults a booting guest, see docs/testbed.md)."""
        end = time.time() + limit
        while time.time() < end:
            vm = husk.GetVm(pb.GetVmRequest(vm=name))
            if vm.status.agent_ready:
                return True
            if vm.state in (pb.VM_STATE_FAILED, pb.VM_STATE_STOPPED):
                print(f"{name}: {vm.status.failure_reason}", file=sys.stderr)
                return False
            time.sleep(0.005)
        raise SystemExit(f"{name}: agent not ready within {limit} s")

    def stats(xs):
        xs = sorted(xs)
        p90 = xs[max(0, int(len(xs) * 0.9 + 0.5) - 1)]
        return statistics.median(xs), p90

    def delete_all(prefix):
        for vm in husk.ListVms(pb.ListVmsRequest()).vms:
            if vm.spec.name.startswith(prefix):
                husk.DeleteVm(pb.DeleteVmRequest(vm=vm.id, force=True))

    counter = [0]

    def clone(template, stub=None):
        counter[0] += 1
        name = f"k{counter[0]}"
        t = time.perf_counter()
        vm = (stub or husk).CreateVm(pb.CreateVmRequest(spec=pb.VmSpec(name=name), template=template))
        took = (time.perf_counter() - t) * 1000
        assert vm.status.agent_ready, vm
        return name, took

    rows = []
    boots = max(2, runs // 4)
    for mib in (128, 1024, 4096):
        t = time.perf_counter()
        tpl = husk.CreateTemplate(pb.CreateTemplateRequest(name=f"t{mib}", spec=pb.VmSpec(memory_mib=mib)))
        rows.append((f"{mib} MiB: template build (boot to agent, snapshot)", f"{(time.perf_counter() - t) * 1000:.0f}",
                     "", f"ms, snapshot {tpl.memory_written / 2**20:.1f} MiB"))
        cold, failed = [], 0
        for i in range(boots * 3):
            if len(cold) == boots:
                break
            t = time.perf_counter()
            husk.CreateVm(pb.CreateVmRequest(spec=pb.VmSpec(name=f"b{mib}-{i}", memory_mib=mib), start=True))
            if wait_ready(f"b{mib}-{i}"):
                cold.append((time.perf_counter() - t) * 1000)
            else:
                failed += 1
            delete_all(f"b{mib}-")
        med, p90 = stats(cold)
        note = f", {failed} boot(s) failed and retried" if failed else ""
        rows.append((f"{mib} MiB: cold boot, CreateVm(start) to agent ready ({len(cold)} runs{note})", f"{med:.0f}", f"{p90:.0f}", "ms"))
        warm = []
        for _ in range(runs):
            name, took = clone(f"t{mib}")
            warm.append(took)
            husk.DeleteVm(pb.DeleteVmRequest(vm=name, force=True))
        med, p90 = stats(warm)
        rows.append((f"{mib} MiB: template clone, CreateVm(template) to agent ready", f"{med:.0f}", f"{p90:.0f}", "ms"))

    # With 10 sandboxes already running (clones of the 128 MiB template).
    running = [clone("t128")[0] for _ in range(10)]
    loaded = []
    for _ in range(runs):
        name, took = clone("t128")
        loaded.append(took)
        husk.DeleteVm(pb.DeleteVmRequest(vm=name, force=True))
    med, p90 = stats(loaded)
    rows.append(("128 MiB: template clone with 10 sandboxes running", f"{med:.0f}", f"{p90:.0f}", "ms"))
    for name in running:
        husk.DeleteVm(pb.DeleteVmRequest(vm=name, force=True))

    for width in (8, 32):
        stubs_ = [client() for _ in range(width)]
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(width) as pool:
            names = list(pool.map(lambda i: clone("t128", stubs_[i])[0], range(width)))
        rate = width / (time.perf_counter() - t)
        rows.append((f"128 MiB: clones per second, {width} concurrent CreateVm(template)", f"{rate:.1f}", "", "clones/s"))
        for name in names:
            husk.DeleteVm(pb.DeleteVmRequest(vm=name, force=True))

    for mib in (128, 1024, 4096):
        husk.DeleteTemplate(pb.DeleteTemplateRequest(name=f"t{mib}"))

    print(f"## start: API call to ready sandbox through huskd (Python grpcio client; {runs} clones per row; median | p90)")
    print()
    print("| measure | median | p90 | unit |")
    print("|---|---|---|---|")
    for name, med, p90, unit in rows:
        print(f"| {name} | {med} | {p90} | {unit} |")
    print()


if __name__ == "__main__":
    main()
