/* job_follow.h - following a fine-tuning job's events as server-sent events
 * (GET /v1/fine_tuning/jobs/{id}/events with Accept: text/event-stream).
 *
 * Each stored event goes out once as "id: <seq>\nevent: <type>\ndata:
 * <the polling endpoint's JSON>\n\n", from ?after= or the Last-Event-ID
 * header on; when the job has ended and every event is out, an "end" event
 * carries the job's final status and the stream closes. Between events the
 * connection sleeps (a deferred reply, http.h): the job worker calls
 * job_hub_notify after it commits, which wakes that job's followers.
 *
 * Threading: the hub is shared by HTTP threads (followers) and job worker
 * threads (notify); one mutex. job_hub_close ends every stream (shutdown).
 */
#ifndef GF_API_JOB_FOLLOW_H
#define GF_API_JOB_FOLLOW_H

#include "api.h"

typedef struct JobHub JobHub;

JobHub *job_hub_new(void);
/* Wakes the followers of job_id (any thread). */
void job_hub_notify(JobHub *h, const char *job_id);
/* Ends every follower's stream at its next read, and refuses new ones. */
void job_hub_close(JobHub *h);
/* After every follower has gone (the HTTP server has stopped). */
void job_hub_free(JobHub *h);

/* Fills resp with the deferred event stream of job_id from seq `after`. */
GfStatus job_follow_or_reply(Api *api, const char *job_id, int64_t after, HttpResp *resp);

/* A job event as the events endpoint returns it (and the follow stream
 * sends it); the caller owns the object. */
cJSON *jobs_event_json(const JobEvent *e);

#endif
