"""The wire contract between istiod_lite and the proxies. A leaf: standard library only."""
