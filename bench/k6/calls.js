// POST /v1/calls at a fixed arrival rate (open loop: a slow server does not slow the offered
// load, it shows as latency and dropped iterations) or with a fixed number of virtual users
// (closed loop: saturation). Every call carries its own send time in `params.t` (epoch ms): the
// owner echoes its params into the result, so the webhook receiver can time POST -> webhook.
import http from 'k6/http';
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';

const accepted = new Counter('accepted');
const refused = new Counter('refused');
const acceptMs = new Trend('accept_ms', true);

const urls = __ENV.URLS.split(',');
const keys = (__ENV.KEYS || 'none').split(',');
const api = __ENV.API || 'bench';
const hook = __ENV.HOOK || '';
const path = __ENV.CALL_PATH || '/v1/calls';
const duration = `${__ENV.DURATION_S}s`;
const vus = Number(__ENV.VUS || 64);

const scenario = __ENV.RATE
  ? {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE),
      timeUnit: '1s',
      duration,
      preAllocatedVUs: vus,
      maxVUs: Number(__ENV.MAX_VUS || 512),
      gracefulStop: '5s',
    }
  : { executor: 'constant-vus', vus, duration, gracefulStop: '5s' };

export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ['avg', 'min', 'med', 'p(95)', 'p(99)', 'max'],
  scenarios: { load: scenario },
};

export default function () {
  const n = exec.scenario.iterationInTest;
  const call = { api, params: { n, t: Date.now() } };
  if (hook) call.webhook_url = hook;
  const res = http.post(urls[n % urls.length] + path, JSON.stringify(call), {
    headers: { 'content-type': 'application/json', authorization: `Bearer ${keys[n % keys.length]}` },
    timeout: '30s',
  });
  if (res.status === 202) {
    accepted.add(1);
    acceptMs.add(res.timings.duration);
  } else {
    refused.add(1);
  }
}

export function handleSummary(data) {
  return { [__ENV.SUMMARY]: JSON.stringify(data) };
}
