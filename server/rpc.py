"""The generated protocol modules, generated first if missing or stale."""
from . import protogen

if protogen.stale():
    protogen.generate()

from ._gen.transplant.v1 import admin_pb2 as admin_pb2  # noqa: E402
from ._gen.transplant.v1 import admin_pb2_grpc as admin_pb2_grpc  # noqa: E402
from ._gen.transplant.v1 import inference_pb2 as inference_pb2  # noqa: E402
from ._gen.transplant.v1 import inference_pb2_grpc as inference_pb2_grpc  # noqa: E402

INFERENCE_SERVICE = "transplant.v1.Inference"
ADMIN_SERVICE = "transplant.v1.Admin"
