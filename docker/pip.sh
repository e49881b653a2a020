# pip for the image build (docker/Dockerfile): with the build secret `ca` as its CA bundle
# when one was passed (`docker build --secret id=ca,src=...`); the secret is a file mounted
# for one RUN step only, so it never lands in a layer. Downloads go to a cache mount.
if [ -f /run/secrets/ca ]; then
  export PIP_CERT=/run/secrets/ca
fi
exec python3 -m pip "$@"
