/* log.h - one-line, timestamped log records on stderr.
 *
 * Every record is "TIME LEVEL [component] message". The component is set once
 * per process (log_init) so that server and worker lines can be told apart in
 * a shared terminal or journal. Thread-safe: each record is one write(2). */
#ifndef STRATA_LOG_H
#define STRATA_LOG_H

enum log_level { LOG_DEBUG = 0, LOG_INFO = 1, LOG_WARN = 2, LOG_ERROR = 3 };

void log_init(const char *component);
void log_set_level(enum log_level level);
void log_msg(enum log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...)  log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...)  log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

#endif
