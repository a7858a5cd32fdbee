#!/usr/bin/env bash
# Development secrets for docker-compose.yml, written to deploy/secrets/ (git-ignored):
#   api-key.txt   a fresh API key with both scopes (give it to callers: Authorization: Bearer)
#   keys.json     its sha256 hash, the keys file the service reads (THINKAHEAD_AUTH__KEYS_FILE)
#   ca.pem, server.pem, server.key   a throwaway CA and a server certificate for localhost,
#                 127.0.0.1 and the compose service names (HTTPS and gRPC over TLS)
# Production: keys from your secret store, certificates from your CA (cert-manager on k8s).
#   curl --cacert deploy/secrets/ca.pem -H "Authorization: Bearer $(cat deploy/secrets/api-key.txt)" \
#     https://localhost:8000/v1/recommend -d '{"user_id": "u1", "k": 10}' -H 'content-type: application/json'
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)/secrets"
mkdir -p "$dir"
cd "$dir"
echo "*" > .gitignore   # never committed

if [[ ! -f api-key.txt ]]; then
  python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > api-key.txt
fi
hash=$(tr -d '\n' < api-key.txt | sha256sum | cut -d' ' -f1)
cat > keys.json <<JSON
{"keys": [{"name": "compose", "sha256": "$hash", "scopes": ["recommend", "events"]}]}
JSON

if [[ ! -f server.pem ]]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=thinkahead dev CA" \
    -keyout ca.key -out ca.pem 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key \
    -out server.csr 2>/dev/null
  printf 'subjectAltName=DNS:localhost,DNS:service,DNS:service-gpu,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > san.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
    -extfile san.ext -out server.pem 2>/dev/null
  rm -f server.csr san.ext ca.srl
fi
# The service runs as a non-root user inside the image: the mounted files must be readable.
chmod 0644 keys.json server.pem server.key ca.pem
echo "wrote $dir (API key in api-key.txt)"
