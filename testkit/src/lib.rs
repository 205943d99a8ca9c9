//! Hermetic test harness for cachalot: real upstream registry, containerd, generated images and a fault-injecting proxy.
