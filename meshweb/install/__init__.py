"""The agent install script and the wheel it installs, served by the control plane.

`GET /install.sh?token=<join token>` (`script.render`) answers a POSIX `sh`
script that sets up `mesh agent` on a fresh Linux host from the wheel served
at `/downloads/` (`wheel.current`), built from the code this control plane
runs. See docs/install.md.
"""
