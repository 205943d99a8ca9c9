//! End-to-end suite for cachalot against a real cluster; the tests live in `tests/`.
