"""What the control plane and the data plane share, with no Django in it:
SPIFFE and SNI naming, key and CSR helpers, wire schemas, and the pure
decision functions both sides must agree on."""
