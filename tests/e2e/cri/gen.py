"""Regenerate api_pb2.py / api_pb2_grpc.py from api.proto: ``python3 tests/e2e/cri/gen.py``."""

from __future__ import annotations

import re
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent


def main() -> None:
    rc = protoc.main(["protoc", f"-I{HERE}", f"--python_out={HERE}", f"--grpc_python_out={HERE}", str(HERE / "api.proto")])
    if rc != 0:
        raise SystemExit(f"protoc failed ({rc})")
    grpc_file = HERE / "api_pb2_grpc.py"
    grpc_file.write_text(re.sub(r"^import api_pb2 as", "from . import api_pb2 as", grpc_file.read_text(), flags=re.M))


if __name__ == "__main__":
    main()
