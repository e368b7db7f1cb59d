"""What the control plane and the data plane share, with no Django in it:
SPIFFE and SNI naming, key and CSR helpers, wire schemas, and the pure
decision functions both sides must agree on."""

import os as _os

# gRPC's fork support (on by default in grpcio) restarts its poller thread in
# the child of every fork(); a child that then closes its inherited file
# descriptors before exec() (subprocess's close_fds, which a `preexec_fn`
# turns into a real fork) closes that poller's epoll fd under it, and the
# child aborts: "Epoll1Poller ... epoll_wait error: Bad file descriptor",
# SIGABRT before exec (grpc/grpc#43055). meshweb processes fork only to exec,
# so they do not need it. Read when grpc is imported: every package that uses
# grpc imports this one first (`registry`, `agents`, `meshproto.proto`).
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
