// The useTaskStatus React hook the project started from, as plain JavaScript:
// no React, the same behaviour. It opens an EventSource on the task's stream,
// parses each message's JSON, acts on `status_update`, records an error on
// `failed`, and closes the source on an error and once the task is final.

const FINAL = new Set(['completed', 'failed', 'cancelled']);

/**
 * Follow task `taskId`; `onChange(state)` after every change.
 * Returns `{state, close}`; `state` is `{status, progress, message, error, closed}`.
 */
export function useTaskStatus(taskId, onChange = () => {}) {
  const state = { status: 'pending', progress: 0, message: '', error: null, closed: false };
  if (!taskId) return { state, close() {} };

  // Relative, as the page's own URLs are: the app may be mounted under a prefix.
  const eventSource = new EventSource(`api/sse/tasks/${taskId}`);

  function close() {
    eventSource.close();
    state.closed = true;
    onChange({ ...state });
  }

  eventSource.onopen = () => {
    console.log('SSE connection established');
  };

  eventSource.onmessage = (event) => {
    try {
      const data = JSON.parse(event.data);
      if (data.type === 'status_update') {
        state.status = data.data.status;
        state.progress = data.data.progress || 0;
        state.message = data.data.message || '';
        if (data.data.status === 'failed') {
          state.error = data.data.error || data.data.message || 'processing failed';
        }
        onChange({ ...state });
        if (FINAL.has(state.status)) close();
      }
    } catch (error) {
      console.error('could not parse an SSE message:', error);
    }
  };

  eventSource.onerror = () => {
    console.error('SSE connection error');
    close();
  };

  return { state, close };
}
