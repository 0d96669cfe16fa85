"""Holds in credits' Redis: the protocol both services speak (`protocol.py`: keys, the scripts in `lua/`,
their replies) and the proxy's side of it (`fast_path.py`: placing holds, parking what it owes)."""
