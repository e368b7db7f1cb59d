"use strict";

// Endpoints the npm package has no wrapper for, over Node's own fetch.
const test = require("node:test");
const assert = require("node:assert/strict");
const zlib = require("node:zlib");
const { client, http, unique, addr } = require("./helpers");

test("snapshot: save is a gzip archive and restores", async () => {
  const consul = client();
  const key = unique("node-snap");
  await consul.kv.set(key, "before");
  const saved = await http("GET", "/v1/snapshot");
  assert.equal(saved.status, 200);
  const data = Buffer.from(await saved.arrayBuffer());
  assert.ok(zlib.gunzipSync(data).length > 0);
  await consul.kv.set(key, "after");
  const restored = await http("PUT", "/v1/snapshot", data);
  assert.equal(restored.status, 200);
  assert.equal((await consul.kv.get(key)).Value, "before");
  const bad = await http("PUT", "/v1/snapshot", data.subarray(0, 50));
  assert.equal(bad.status, 400);
});

test("coordinates: update and read", async () => {
  const consul = client();
  const node = unique("node-coord");
  await consul.catalog.register({ node, address: "10.5.0.1" });
  const coord = { Vec: [0.01, 0, 0, 0, 0, 0, 0, 0], Error: 0.2, Adjustment: 0, Height: 0.00001 };
  const put = await http("PUT", "/v1/coordinate/update", { Node: node, Coord: coord });
  assert.equal(put.status, 200);
  const got = await (await http("GET", `/v1/coordinate/node/${node}`)).json();
  assert.deepEqual(got[0].Coord.Vec, coord.Vec);
});

test("operator: autopilot health and raft configuration", async () => {
  const health = await (await http("GET", "/v1/operator/autopilot/health")).json();
  assert.equal(health.Healthy, true);
  assert.deepEqual(health.Servers.map((s) => s.Address), [addr]);
  const raft = await (await http("GET", "/v1/operator/raft/configuration")).json();
  assert.equal(raft.Servers[0].Address, addr);
});
