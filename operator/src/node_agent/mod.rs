//! The node agent: renders containerd `hosts.toml` files under a certs.d directory, safely.
