"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");
const { client, http, unique } = require("./helpers");

// The package's query.explain reads the first item of an array, but the endpoint
// answers an object ({"Query": ...}) in Consul and here alike: explain over fetch.
async function explain(name) {
  const r = await http("GET", `/v1/query/${encodeURIComponent(name)}/explain`);
  assert.equal(r.status, 200);
  return r.json();
}

test("prepared queries: create, get, list, execute, explain, destroy", async () => {
  const consul = client();
  const svc = unique("node-pq");
  await consul.catalog.register({
    node: `${svc}-n`,
    address: "10.4.0.1",
    service: { service: svc, id: svc, port: 5432, tags: ["primary"] },
  });
  const { ID: id } = await consul.query.create({
    name: svc,
    service: { service: svc, onlypassing: false, tags: ["primary"] },
    dns: { ttl: "5s" },
  });
  const got = await consul.query.get(id);
  assert.equal(got.Name, svc);
  assert.deepEqual(got.Service.Tags, ["primary"]);
  assert.ok((await consul.query.list()).some((q) => q.ID === id));
  const answer = await consul.query.execute(svc);
  assert.equal(answer.Service, svc);
  assert.deepEqual(answer.Nodes.map((n) => n.Node.Node), [`${svc}-n`]);
  assert.equal(answer.Datacenter, "dc1");
  const explained = await explain(svc);
  assert.equal(explained.Query.Service.Service, svc);
  await consul.query.destroy(id);
  await assert.rejects(consul.query.get(id), (err) => err.statusCode === 404);
});

test("prepared query templates interpolate the name", async () => {
  const consul = client();
  const prefix = `${unique("node-tpl")}-`;
  await consul.query.create({
    name: prefix,
    template: { type: "name_prefix_match", regexp: `^${prefix}(.+)$` },
    service: { service: "svc-${match(1)}" },
  });
  const explained = await explain(`${prefix}billing`);
  assert.equal(explained.Query.Service.Service, "svc-billing");
});

test("events: fire and list", async () => {
  const consul = client();
  const name = unique("node-ev");
  const fired = await consul.event.fire(name, "payload-1");
  assert.equal(fired.Name, name);
  const listed = await consul.event.list({ name });
  assert.equal(listed.length, 1);
  assert.equal(listed[0].ID, fired.ID);
  assert.equal(listed[0].Payload, "payload-1");
});

test("events: a payload over the limit is refused", async () => {
  const consul = client();
  await assert.rejects(
    consul.event.fire(unique("node-ev"), "x".repeat(600)),
    (err) => err.statusCode === 413,
  );
});
