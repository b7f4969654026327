"""The messages and service of the V2 protocol's gRPC transport (`inference.GRPCInferenceService`).

`grpc_service.proto` and `model_config.proto` beside this file are the definitions,
with the field numbers of Triton's for wire compatibility. The Python modules next to
them are generated from them and committed; edit the `.proto` files, never the output:

- `grpc_service_pb2` (and `.pyi`): the request and response messages;
- `grpc_service_pb2_grpc` (and `.pyi`): the servicer base class, the client stub and
  `add_GRPCInferenceServiceServicer_to_server`;
- `model_config_pb2` (and `.pyi`): `ModelConfig`, what the ModelConfig call answers.

Regenerate them after a change to a `.proto` file, from the repository's root, with
the dev tools installed (`make install-test`, which brings grpcio-tools and
mypy-protobuf at their pinned versions)::

    make proto        # runs scripts/gen_proto.sh

`tests/test_proto.py` checks the result against tritonclient's own definitions.

The generated modules register their descriptors in `POOL`, not in protobuf's default
pool: other libraries (tritonclient.grpc, KServe's and MLServer's servers) put their own
definitions of the same `inference.*` names in the default pool, and two definitions of
one name in one pool fail at import ("duplicate symbol"). So tidegate and tritonclient's
gRPC client load side by side in one process. Whatever looks messages up by name, such
as server reflection, is to be given `POOL`.
"""

from google.protobuf import descriptor_pool

__all__ = ["POOL"]

# The descriptor pool of tidegate's own protocol definitions (see the docstring).
POOL = descriptor_pool.DescriptorPool()
