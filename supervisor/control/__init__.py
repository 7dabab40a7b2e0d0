"""An embedded Tailscale control plane speaking ts2021 on loopback.

It is the default login server (a newcomer sees proxies run with no tailnet)
and the control every real-binary test runs against.
"""
