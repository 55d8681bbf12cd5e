//! Host prerequisites: the kernel modules each backend needs, how to detect them, the cache.
