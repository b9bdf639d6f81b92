// The server's HTTP API. Every URL is relative so that the page works when the
// app is mounted under a prefix (e.g. /zhiyi/); the session cookie authenticates.

/** An answer other than success, with the server's `code` and `message`. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
  }
}

async function request(method, path, { json, body, headers = {} } = {}) {
  const init = { method, headers: { Accept: 'application/json', ...headers }, credentials: 'same-origin' };
  if (json !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, 'network_error', 'The server could not be reached.');
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    // A proxy's HTML error page, or an empty body: fall back to the status line.
  }
  if (!response.ok || (data && data.success === false)) {
    throw new ApiError(
      response.status,
      data?.code ?? 'http_error',
      data?.message ?? `${response.status} ${response.statusText}`,
    );
  }
  return data;
}

/** `{userId, credits}` of the logged-in user; ApiError 401 when logged out. */
export const me = () => request('GET', 'api/me');

/** Exchange an API token for the session cookie. */
export const login = (token) => request('POST', 'api/session', { json: { token } });

/** End the session (the cookie's token is revoked). */
export const logout = () => request('DELETE', 'api/session');

/** The task types with their params, extensions, cost rule and engines. */
export const taskTypes = () => request('GET', 'api/task-types');

/** One page of the user's tasks, newest first: `{tasks, nextCursor}`. */
export function listTasks({ cursor = null, limit = 20 } = {}) {
  const query = new URLSearchParams({ limit: String(limit) });
  if (cursor !== null && cursor !== undefined) query.set('cursor', String(cursor));
  return request('GET', `api/tasks?${query}`);
}

export const getTask = (id) => request('GET', `api/tasks/${encodeURIComponent(id)}`);
export const cancelTask = (id) => request('POST', `api/tasks/${encodeURIComponent(id)}/cancel`);
export const retryTask = (id) => request('POST', `api/tasks/${encodeURIComponent(id)}/retry`);
export const deleteTask = (id) => request('DELETE', `api/tasks/${encodeURIComponent(id)}`);

/**
 * Relative link to a task's result. The server's `resultUrl` is an absolute path,
 * which is wrong behind a proxy that strips a prefix; this one resolves against the page.
 */
export const resultHref = (id) => `api/tasks/${encodeURIComponent(id)}/result`;

/** Upload one file as a new task: `{taskId, task, sseUrl}`. */
export function createTask(file, taskType, params, idempotencyKey) {
  const form = new FormData();
  form.append('taskType', taskType);
  form.append('params', JSON.stringify(params));
  form.append('file', file, file.name);
  const headers = idempotencyKey ? { 'Idempotency-Key': idempotencyKey } : {};
  return request('POST', 'api/tasks/create', { body: form, headers });
}

/** What creating this task would charge: `{quote: {credits, segments, fromMemory, ...}}`. */
export function quoteTask(file, taskType, params) {
  const form = new FormData();
  form.append('taskType', taskType);
  form.append('params', JSON.stringify(params));
  form.append('file', file, file.name);
  return request('POST', 'api/tasks/quote', { body: form });
}

/** The user's glossaries: `{glossaries: [{name, sourceLang, targetLang, terms}]}`. */
export const glossaries = () => request('GET', 'api/glossaries');
