#!/usr/bin/env bash
# Make the TLS certificates and SuperNode keys for a secured Flower deployment of FlexLoRA.
#
#   scripts/make_certs.sh OUT_DIR [NUM_NODES] [EXTRA_SAN ...]
#
# Writes (never overwrites an existing OUT_DIR/ca.key):
#   OUT_DIR/ca.crt, ca.key            self-signed CA (RSA 4096, 10 years); keep ca.key offline
#   OUT_DIR/server.crt, server.key    SuperLink certificate signed by the CA; SANs: localhost,
#                                     127.0.0.1, ::1 and every EXTRA_SAN (DNS name or IP)
#   OUT_DIR/nodes/node-<i>            SuperNode i's private key (ECDSA P-384, OpenSSH format)
#   OUT_DIR/nodes/node-<i>.pub        its public key, to register with `flwr supernode register`
#
# Then (Flower 1.42; see docs/security.md):
#   flower-superlink --ssl-ca-certfile OUT/ca.crt --ssl-certfile OUT/server.crt \
#                    --ssl-keyfile OUT/server.key --enable-supernode-auth
#   flwr supernode register OUT/nodes/node-0.pub <superlink-connection>
#   flower-supernode --superlink 127.0.0.1:9092 --root-certificates OUT/ca.crt \
#                    --auth-supernode-private-key OUT/nodes/node-0 --clientappio-api-address 127.0.0.1:9094
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit $(( $# < 1 ? 2 : 0 ))
fi
out="$1"; shift
nodes="${1:-2}"; [[ $# -gt 0 ]] && shift
if ! [[ "$nodes" =~ ^[0-9]+$ ]]; then
  echo "make_certs.sh: NUM_NODES must be a non-negative integer, got '$nodes'" >&2; exit 2
fi
command -v openssl >/dev/null || { echo "make_certs.sh: openssl not found" >&2; exit 1; }
command -v ssh-keygen >/dev/null || { echo "make_certs.sh: ssh-keygen not found" >&2; exit 1; }

mkdir -p "$out/nodes"
umask 077
if [[ -e "$out/ca.key" ]]; then
  echo "make_certs.sh: $out/ca.key exists; refusing to overwrite (remove $out to start over)" >&2; exit 1
fi

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for extra in "$@"; do
  if [[ "$extra" =~ ^[0-9.]+$ || "$extra" == *:* ]]; then san="$san,IP:$extra"; else san="$san,DNS:$extra"; fi
done

openssl genrsa -out "$out/ca.key" 4096 2>/dev/null
openssl req -x509 -new -key "$out/ca.key" -sha256 -days 3650 -subj "/CN=FlexLoRA deployment CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$out/ca.crt"

openssl genrsa -out "$out/server.key" 4096 2>/dev/null
openssl req -new -key "$out/server.key" -subj "/CN=flexlora-superlink" -out "$out/server.csr"
ext="$(mktemp)"; trap 'rm -f "$ext"' EXIT
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > "$ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -days 825 -sha256 -extfile "$ext" -out "$out/server.crt" 2>/dev/null
rm -f "$out/server.csr" "$out/ca.srl"
openssl verify -CAfile "$out/ca.crt" "$out/server.crt" >/dev/null

for ((i = 0; i < nodes; i++)); do
  rm -f "$out/nodes/node-$i" "$out/nodes/node-$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "flexlora-node-$i" -f "$out/nodes/node-$i"
done
chmod 644 "$out/ca.crt" "$out/server.crt" "$out"/nodes/*.pub 2>/dev/null || true
echo "wrote CA, SuperLink certificate (SAN $san) and $nodes SuperNode key pair(s) to $out"
