#!/bin/sh
# meshweb agent installer, made by the control plane at @@CP_URL@@
#
#   curl -fsS '@@CP_URL@@/install.sh?token=<join token>' | sh
#   sh install.sh [--token TOKEN] [--node NAME] [--bind IP] [--prefix DIR] [--no-systemd]
#   sh install.sh --uninstall [--prefix DIR]
#
# What it does, in this order (nothing is sent with the join token before the
# control plane has proved it holds the pinned CA):
#   1. checks its inputs: a join token, a well-formed CA pin, Python 3.11+;
#   2. checks the control plane answers at @@CP_URL@@;
#   3. opens TLS to the agent port @@JOIN_ADDR@@ and looks for the pinned CA
#      root in the chain it presents; stops if it is not there;
#   4. downloads the meshweb wheel from @@CP_URL@@/downloads/, checks its SHA-256,
#      installs it in a virtual environment (PREFIX/opt/meshweb/venv);
#   5. writes PREFIX/etc/meshweb/agent.env (control plane, join token, CA pin;
#      mode 0600) and the start command PREFIX/opt/meshweb/bin/meshweb-agent;
#   6. with systemd running: installs and (re)starts meshweb-agent.service;
#      otherwise prints the command that starts the agent.
# Re-running it is safe (same result; an agent that already joined keeps its
# identity). Environment: MESH_PYTHON (default python3), MESH_PIP_ARGS (extra
# `pip install` arguments, e.g. an index or `--no-index --find-links DIR`),
# MESH_JOIN_TOKEN (instead of --token), MESH_PREFIX (instead of --prefix).

MESH_CP_URL='@@CP_URL@@'
MESH_JOIN_ADDR='@@JOIN_ADDR@@'
MESH_CA_PIN='@@CA_PIN@@'
MESH_WHEEL='@@WHEEL@@'
MESH_WHEEL_SHA256='@@WHEEL_SHA256@@'
MESH_TOKEN_IN_SCRIPT='@@TOKEN@@'

say() { printf 'meshweb install: %s\n' "$*" >&2; }
die() { code=$1; shift; say "error: $*"; exit "$code"; }

usage() {
  cat >&2 <<'EOF'
usage: sh install.sh [--token TOKEN] [--node NAME] [--bind IP] [--prefix DIR] [--no-systemd]
       sh install.sh --uninstall [--prefix DIR]
       sh install.sh --print-unit [--prefix DIR]   (the systemd unit it installs)
EOF
}

# Python helpers (standard library only: they run before anything is downloaded).
PY_FETCH='
import sys, urllib.error, urllib.request
url, dest = sys.argv[1], sys.argv[2]
try:
    with urllib.request.urlopen(url, timeout=30) as r, open(dest, "wb") as out:
        while True:
            chunk = r.read(65536)
            if not chunk:
                break
            out.write(chunk)
except urllib.error.HTTPError as e:
    body = e.read(300).decode("utf-8", "replace").strip()
    print(f"{url} answered HTTP {e.code}: {body}", file=sys.stderr)
    sys.exit(6)
except (OSError, urllib.error.URLError) as e:
    reason = getattr(e, "reason", e)
    print(f"cannot reach the control plane at {url}: {reason}", file=sys.stderr)
    sys.exit(4)
'
PY_PIN='
import hashlib, socket, ssl, sys
addr, pin = sys.argv[1], sys.argv[2].removeprefix("sha256:")
host, _, port = addr.rpartition(":")
host = host.strip("[]")
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE  # only to read the chain; trust comes from the pin
ctx.set_alpn_protocols(["h2"])
try:
    with socket.create_connection((host, int(port)), timeout=15) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            if hasattr(tls, "get_unverified_chain"):
                chain = tls.get_unverified_chain()
            else:
                chain = tls._sslobj.get_unverified_chain()
            ders = [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain or []]
except (OSError, ValueError) as e:
    print(
        f"cannot reach the control plane agent port {addr}: {e} "
        "(the control plane MESH_GRPC_ADDR must be reachable from this host)",
        file=sys.stderr,
    )
    sys.exit(4)
seen = [hashlib.sha256(d).hexdigest() for d in ders]
if pin not in seen:
    shown = ", ".join("sha256:" + s for s in seen) or "none"
    print(
        f"the control plane at {addr} presented no certificate matching the CA pin sha256:{pin} "
        f"(it presented: {shown}); "
        "refusing to send the join token. The pin in this script was altered, or "
        f"{addr} is not your control plane: fetch the script again from your control plane.",
        file=sys.stderr,
    )
    sys.exit(5)
'
PY_SHA256='
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(65536), b""):
        h.update(chunk)
print(h.hexdigest())
'

paths() {
  root=${prefix%/}
  base="$root/opt/meshweb"
  venv="$base/venv"
  starter="$base/bin/meshweb-agent"
  etc="$root/etc/meshweb"
  conf="$etc/agent.env"
  services="$etc/services.d"
  data="$root/var/lib/meshweb/agent"
  unit=/etc/systemd/system/meshweb-agent.service
}

has_systemd() {
  [ "$use_systemd" = yes ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

uninstall() {
  paths
  if has_systemd && [ -f "$unit" ]; then
    systemctl disable --now meshweb-agent.service </dev/null >/dev/null 2>&1 || true
    rm -f "$unit"
    systemctl daemon-reload </dev/null || true
    say "stopped and removed meshweb-agent.service"
  elif [ -f "$data/agent.pid" ]; then
    pid=$(cat "$data/agent.pid")
    # Only if that pid is still our agent (a stale pid may belong to anything now).
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
    case $cmdline in
      "$venv/bin/python $venv/bin/mesh agent "*)
        kill "$pid" 2>/dev/null && say "stopped the agent (pid $pid)" ;;
    esac
  fi
  rm -rf "$venv" "$base/bin" "$data"
  rm -f "$conf"
  # Service definitions are the operator's: kept unless the directory is empty.
  rmdir "$services" "$etc" "$base" "$root/var/lib/meshweb" 2>/dev/null || true
  say "removed the meshweb agent (venv, config, identity) under ${root:-/}"
  say "on the control plane, \`mesh join-token revoke -nodes <token id>\` removes its node"
}

check_inputs() {
  if [ -z "$token" ]; then
    die 2 "no join token: fetch this script as $MESH_CP_URL/install.sh?token=<join token> (a token from \`mesh join-token create\`), or run it with --token TOKEN"
  fi
  case $token in
    *[!A-Za-z0-9._-]* | *.*.* | .* | *.) die 2 "the join token is malformed: expected <id>.<secret> as \`mesh join-token create\` prints it" ;;
    *.*) ;;
    *) die 2 "the join token is malformed: expected <id>.<secret> as \`mesh join-token create\` prints it" ;;
  esac
  pin_hex=${MESH_CA_PIN#sha256:}
  if [ "$pin_hex" = "$MESH_CA_PIN" ] || [ ${#pin_hex} -ne 64 ]; then
    die 2 "the CA pin in this script is malformed ('$MESH_CA_PIN'): the script was altered; fetch it again from your control plane"
  fi
  case $pin_hex in
    *[!0-9a-f]*) die 2 "the CA pin in this script is malformed ('$MESH_CA_PIN'): the script was altered; fetch it again from your control plane" ;;
  esac
  command -v "$py" >/dev/null 2>&1 || die 3 "$py not found: install Python 3.11 or newer (and its venv module), or set MESH_PYTHON"
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' </dev/null ||
    die 3 "meshweb needs Python 3.11 or newer ($py is $("$py" --version 2>&1))"
  "$py" -c 'import venv, ensurepip' </dev/null 2>/dev/null ||
    die 3 "$py cannot create virtual environments: install its venv module (Debian/Ubuntu: apt-get install python3-venv)"
  if [ -z "$prefix" ] && [ "$(id -u)" != 0 ]; then
    die 2 "run as root (it writes /opt/meshweb, /etc/meshweb and /var/lib/meshweb), or give --prefix DIR"
  fi
}

check_control_plane() {
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$py" -c "$PY_FETCH" "$MESH_CP_URL/healthz" "$tmp/health" </dev/null 2>"$tmp/err" ||
    die 4 "$(cat "$tmp/err")"
  say "control plane $MESH_CP_URL is reachable"
  "$py" -c "$PY_PIN" "$MESH_JOIN_ADDR" "$MESH_CA_PIN" </dev/null 2>"$tmp/err" ||
    die $? "$(cat "$tmp/err")"
  say "the agent port $MESH_JOIN_ADDR presented the pinned CA ($MESH_CA_PIN)"
}

install_wheel() {
  "$py" -c "$PY_FETCH" "$MESH_CP_URL/downloads/$MESH_WHEEL" "$tmp/$MESH_WHEEL" </dev/null 2>"$tmp/err" ||
    die $? "downloading the meshweb wheel: $(cat "$tmp/err") (if the control plane was just upgraded, fetch this script again)"
  got=$("$py" -c "$PY_SHA256" "$tmp/$MESH_WHEEL" </dev/null)
  [ "$got" = "$MESH_WHEEL_SHA256" ] ||
    die 6 "the downloaded $MESH_WHEEL has SHA-256 $got, not $MESH_WHEEL_SHA256: not installing it"
  if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$base"
    "$py" -m venv "$venv" </dev/null || die 3 "could not create the virtual environment $venv"
  fi
  # shellcheck disable=SC2086  # MESH_PIP_ARGS is a list of arguments
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check ${MESH_PIP_ARGS:-} \
    "$tmp/$MESH_WHEEL" </dev/null || die 6 "pip could not install $MESH_WHEEL into $venv"
  say "installed $MESH_WHEEL into $venv"
}

write_config() {
  mkdir -p "$etc" "$services" "$data" "$base/bin"
  chmod 0700 "$data"
  old_umask=$(umask)
  umask 077
  cat >"$conf.tmp" <<EOF
# meshweb agent, written by the installer from $MESH_CP_URL
MESH_CONTROL_PLANE='$MESH_CP_URL'
MESH_JOIN_ADDR='$MESH_JOIN_ADDR'
MESH_CA_PIN='$MESH_CA_PIN'
MESH_JOIN_TOKEN='$token'
MESH_NODE='$node'
MESH_BIND='$bind'
EOF
  mv -f "$conf.tmp" "$conf"
  umask "$old_umask"
  cat >"$starter.tmp" <<EOF
#!/bin/sh
# Starts the meshweb agent with $conf (written by the meshweb installer). The
# values are read as shell variables, not exported: the agent's children
# (sidecars, check scripts) never see the join token.
. '$conf'
set -- -data-dir '$data' -config-dir '$services' -join "\$MESH_JOIN_ADDR"
[ -n "\$MESH_NODE" ] && set -- "\$@" -node "\$MESH_NODE"
[ -n "\$MESH_BIND" ] && set -- "\$@" -bind "\$MESH_BIND"
# The token is only needed until the agent has joined (its identity is kept in the data dir).
if [ ! -f '$data/identity/identity.json' ]; then
  set -- "\$@" -join-token "\$MESH_JOIN_TOKEN" -ca-pin "\$MESH_CA_PIN"
fi
echo \$\$ >'$data/agent.pid'
exec '$venv/bin/mesh' agent "\$@"
EOF
  chmod 0755 "$starter.tmp"
  mv -f "$starter.tmp" "$starter"
  say "wrote $conf and $starter"
}

unit_text() {
  cat <<EOF
# meshweb agent, installed by the meshweb installer from $MESH_CP_URL
[Unit]
Description=meshweb agent
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=$starter
ExecReload=/bin/kill -HUP \$MAINPID
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
EOF
}

start_agent() {
  if has_systemd; then
    unit_text >"$unit.tmp"
    mv -f "$unit.tmp" "$unit"
    systemctl daemon-reload </dev/null || die 7 "systemctl daemon-reload failed"
    systemctl enable meshweb-agent.service </dev/null >/dev/null 2>&1 || die 7 "systemctl enable meshweb-agent failed"
    systemctl restart meshweb-agent.service </dev/null || die 7 "systemctl restart meshweb-agent failed (see journalctl -u meshweb-agent)"
    say "meshweb-agent.service is running (journalctl -u meshweb-agent to follow it)"
  else
    say "systemd is not running here: start the agent yourself."
    echo "Start the agent with:"
    echo "  $starter"
  fi
  say "service definitions go in $services (then: kill -HUP the agent, or systemctl reload meshweb-agent)"
}

main() {
  token=${MESH_TOKEN_IN_SCRIPT:-${MESH_JOIN_TOKEN:-}}
  prefix=${MESH_PREFIX:-}
  py=${MESH_PYTHON:-python3}
  node=
  bind=
  use_systemd=yes
  action=install
  while [ $# -gt 0 ]; do
    case $1 in
      --token) [ $# -ge 2 ] || die 2 "--token needs a value"; token=$2; shift 2 ;;
      --token=*) token=${1#--token=}; shift ;;
      --node) [ $# -ge 2 ] || die 2 "--node needs a value"; node=$2; shift 2 ;;
      --node=*) node=${1#--node=}; shift ;;
      --bind) [ $# -ge 2 ] || die 2 "--bind needs a value"; bind=$2; shift 2 ;;
      --bind=*) bind=${1#--bind=}; shift ;;
      --prefix) [ $# -ge 2 ] || die 2 "--prefix needs a value"; prefix=$2; shift 2 ;;
      --prefix=*) prefix=${1#--prefix=}; shift ;;
      --no-systemd) use_systemd=no; shift ;;
      --uninstall) action=uninstall; shift ;;
      --print-unit) action=print-unit; shift ;;
      -h | --help) usage; exit 0 ;;
      *) usage; die 2 "unknown option $1" ;;
    esac
  done
  case $node in
    *[!A-Za-z0-9._-]*) die 2 "--node: use letters, digits, '.', '_' and '-'" ;;
  esac
  case $bind in
    *[!0-9A-Fa-f.:]*) die 2 "--bind: an IP address of this host (the one other hosts reach its sidecars on)" ;;
  esac
  case $prefix in
    "" | /*) ;;
    *) die 2 "--prefix: give an absolute path" ;;
  esac
  case $prefix in
    *[\'\"\$\`\\[:space:]]*) die 2 "--prefix: a path without quotes, \$, backquotes, backslashes or spaces, please" ;;
  esac
  if [ "$action" = uninstall ]; then
    uninstall
    exit 0
  fi
  if [ "$action" = print-unit ]; then
    paths
    unit_text
    exit 0
  fi
  check_inputs
  paths
  check_control_plane
  install_wheel
  write_config
  start_agent
}

# Everything runs from here, after sh has read the whole script: a command that
# reads standard input cannot swallow the rest of it under `curl ... | sh`.
main "$@"
