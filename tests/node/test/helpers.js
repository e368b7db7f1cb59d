// Shared by the suites: a client of the unmodified npm `consul` package pointed at
// the mesh server that `tests/node/run` (or the pytest wrapper) started.
"use strict";

const Consul = require("consul");

const addr = process.env.MESH_TEST_HTTP_ADDR;
if (!addr) {
  throw new Error("MESH_TEST_HTTP_ADDR is not set: run these through tests/node/run");
}
const [host, port] = addr.split(":");

function client() {
  return new Consul({ host, port: Number(port) });
}

// Raw HTTP for the endpoints the package does not wrap (snapshot, coordinate, operator).
async function http(method, path, body) {
  const init = { method };
  if (body !== undefined) {
    init.body = typeof body === "string" || Buffer.isBuffer(body) ? body : JSON.stringify(body);
  }
  return fetch(`http://${addr}${path}`, init);
}

let counter = 0;
function unique(prefix) {
  counter += 1;
  return `${prefix}-${process.pid}-${Date.now().toString(36)}-${counter}`;
}

function b64(text) {
  return Buffer.from(text).toString("base64");
}

module.exports = { client, http, unique, b64, addr };
