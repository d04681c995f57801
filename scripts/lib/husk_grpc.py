"""What the Python benchmarks share: husk.v1 stubs generated from proto/ at run time, and a
client over huskd's Unix socket."""
import sys
import tempfile


def load(proto_dir):
    """Generates the husk.v1 stubs from PROTO_DIR and returns (pb, rpc, grpc)."""
    from grpc_tools import protoc
    import importlib.resources
    out = tempfile.mkdtemp(prefix="husk-bench-")
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    protoc.main(["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}",
                 f"--grpc_python_out={out}", "husk/v1/husk.proto"])
    sys.path.insert(0, out)
    import grpc
    from husk.v1 import husk_pb2, husk_pb2_grpc
    return husk_pb2, husk_pb2_grpc, grpc


def client(grpc, rpc, socket):
    """A HuskStub on the Unix socket SOCKET."""
    ch = grpc.insecure_channel(f"unix://{socket}", options=[("grpc.default_authority", "localhost")])
    return rpc.HuskStub(ch)
