/* test_server_pure.c - the server's pure helpers: list cursors, retry
 * backoff, migration and user names, roles, job states, UTF-8 cleaning of
 * log lines and the configuration loader. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "server/api.h"
#include "server/auth.h"
#include "server/config.h"
#include "server/http.h"
#include "server/job.h"
#include "server/migrate.h"

static void test_cursor_round_trip(void **state) {
    (void)state;
    const int64_t ids[] = {1, 9, 10, 255, 4096, 123456789, INT64_C(0x7fffffffffff)};
    for (size_t i = 0; i < sizeof ids / sizeof ids[0]; i++) {
        char text[24];
        int64_t back = 0;
        api_cursor_format(ids[i], text, sizeof text);
        assert_int_equal(api_cursor_parse(text, &back), 0);
        assert_int_equal(back, ids[i]);
    }
    char text[24];
    api_cursor_format(255, text, sizeof text);
    assert_string_equal(text, "ff");
}

static void test_cursor_rejects_garbage(void **state) {
    (void)state;
    int64_t id = 42;
    const char *bad[] = {"", "0", "000", "zz", "FF", "-1", "1 ", "12345678901234567", "0x10"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(api_cursor_parse(bad[i], &id), -1);
    assert_int_equal(id, 42); /* untouched on failure */
}

static void test_retry_delay_is_capped_exponential(void **state) {
    (void)state;
    assert_int_equal(job_retry_delay(1, 5, 300), 5);
    assert_int_equal(job_retry_delay(2, 5, 300), 10);
    assert_int_equal(job_retry_delay(3, 5, 300), 20);
    assert_int_equal(job_retry_delay(6, 5, 300), 160);
    assert_int_equal(job_retry_delay(7, 5, 300), 300);
    assert_int_equal(job_retry_delay(100, 5, 300), 300);
    assert_int_equal(job_retry_delay(1000000, 1, 2), 2);
    assert_int_equal(job_retry_delay(0, 5, 300), 5);
    assert_int_equal(job_retry_delay(3, 0, 300), 0);
}

static void test_migration_names(void **state) {
    (void)state;
    assert_true(migrate_valid_name("0001_init.sql"));
    assert_true(migrate_valid_name("0042_add_index_2.sql"));
    assert_false(migrate_valid_name("001_init.sql"));
    assert_false(migrate_valid_name("0001-init.sql"));
    assert_false(migrate_valid_name("0001_Init.sql"));
    assert_false(migrate_valid_name("0001_init.sql.bak"));
    assert_false(migrate_valid_name("0001_.sql"));
    assert_false(migrate_valid_name("abcd_init.sql"));
    assert_false(migrate_valid_name("README.md"));
}

static void test_user_names_and_roles(void **state) {
    (void)state;
    assert_true(auth_valid_user_name("alice"));
    assert_true(auth_valid_user_name("it-worker.2_b"));
    assert_false(auth_valid_user_name(""));
    assert_false(auth_valid_user_name("-x"));
    assert_false(auth_valid_user_name(".x"));
    assert_false(auth_valid_user_name("a b"));
    assert_false(auth_valid_user_name("a/b"));
    char long_name[80];
    memset(long_name, 'a', 65);
    long_name[65] = '\0';
    assert_false(auth_valid_user_name(long_name));

    enum auth_role role = AUTH_USER;
    assert_int_equal(auth_role_parse("worker", &role), 0);
    assert_int_equal(role, AUTH_WORKER);
    assert_string_equal(auth_role_name(role), "worker");
    assert_int_equal(auth_role_parse("root", &role), -1);
    assert_int_equal(auth_role_parse("Admin", &role), -1);
    assert_int_equal(role, AUTH_WORKER);
}

static void test_job_states(void **state) {
    (void)state;
    const char *good[] = {"blocked", "queued", "running", "succeeded", "failed", "cancelled"};
    for (size_t i = 0; i < 6; i++) assert_true(job_valid_state(good[i]));
    assert_false(job_valid_state("done"));
    assert_false(job_valid_state("Queued"));
    assert_false(job_valid_state(""));
}

static void test_utf8_clean(void **state) {
    (void)state;
    char out[64];
    /* valid text, including 2-, 3- and 4-byte sequences, is kept as it is */
    const char *ok = "a\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80z";
    assert_int_equal(http_utf8_clean(ok, strlen(ok), out), strlen(ok));
    assert_string_equal(out, ok);
    /* a stray byte, a truncated sequence, an overlong '/' and a surrogate */
    const char bad[] = "x\xff" "y\xe2\x82" "z\xc0\xaf" "\xed\xa0\x80";
    size_t n = http_utf8_clean(bad, sizeof bad - 1, out);
    const char *want = "x\xef\xbf\xbd" "y\xef\xbf\xbd\xef\xbf\xbd" "z\xef\xbf\xbd\xef\xbf\xbd"
                       "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd";
    assert_int_equal(n, strlen(want));
    assert_string_equal(out, want);
}

static void test_config_env_and_flags(void **state) {
    (void)state;
    cfg_t cfg;
    char err[ERR_LEN];
    char *rest[8];
    int nrest = 0;
    setenv("STRATA_HOME", "/tmp/strata-unit-home", 1);
    setenv("STRATA_PORT", "18999", 1);
    setenv("STRATA_LEASE_S", "7", 1);
    setenv("STRATA_MIGRATIONS", ".", 1);
    unsetenv("STRATA_DATABASE_URL");
    char *argv[] = {"strata-server", "serve", "--port", "18998", "--retry-base-s=3", "--extra"};
    assert_int_equal(cfg_load(&cfg, 6, argv, 2, rest, &nrest, err, sizeof err), 0);
    assert_int_equal(cfg.port, 18998);       /* a flag beats the environment */
    assert_int_equal(cfg.lease_s, 7);
    assert_int_equal(cfg.retry_base_s, 3);
    assert_int_equal(cfg.retry_max_s, 300);
    assert_int_equal(cfg.max_body, 1048576);
    assert_string_equal(cfg.home, "/tmp/strata-unit-home");
    assert_string_equal(cfg.tmp_dir, "/tmp/strata-unit-home/artifacts/tmp");
    assert_string_equal(cfg.token_path, "/tmp/strata-unit-home/admin.token");
    assert_string_equal(cfg.database_url, "host=/tmp/strata-unit-home/pg/run dbname=strata");
    assert_int_equal(nrest, 1);
    assert_string_equal(rest[0], "--extra");

    setenv("STRATA_PORT", "99999", 1);
    assert_int_equal(cfg_load(&cfg, 2, argv, 2, rest, &nrest, err, sizeof err), -1);
    assert_non_null(strstr(err, "STRATA_PORT"));
    setenv("STRATA_PORT", "80x", 1);
    assert_int_equal(cfg_load(&cfg, 2, argv, 2, rest, &nrest, err, sizeof err), -1);
    unsetenv("STRATA_PORT");
    setenv("STRATA_MIGRATIONS", "/nonexistent/dir", 1);
    assert_int_equal(cfg_load(&cfg, 2, argv, 2, rest, &nrest, err, sizeof err), -1);
    assert_non_null(strstr(err, "not a directory"));
    unsetenv("STRATA_MIGRATIONS");
    unsetenv("STRATA_HOME");
    unsetenv("STRATA_LEASE_S");
}

static void test_route_matching(void **state) {
    (void)state;
    int64_t ids[2] = {0, 0};
    assert_true(http_match("/api/v1/jobs", "/api/v1/jobs", ids));
    assert_true(http_match("/api/v1/jobs/{id}/heartbeat", "/api/v1/jobs/42/heartbeat", ids));
    assert_int_equal(ids[0], 42);
    assert_true(http_match("/api/v1/artifacts/{id}", "/api/v1/artifacts/9223372036854775807",
                           ids));
    assert_int_equal(ids[0], INT64_MAX);

    const char *misses[] = {
        "/api/v1/jobs/",                      /* trailing slash */
        "/api/v1/jobs/0",                     /* ids are positive */
        "/api/v1/jobs/007",                   /* no leading zeros */
        "/api/v1/jobs/-1",
        "/api/v1/jobs/+1",
        "/api/v1/jobs/1x",
        "/api/v1/jobs/9223372036854775808",   /* overflow */
        "/api/v1/jobs//",
        "/api/v1/jobs/1/",
        "/api/v1/jobs/1/heartbeat",           /* longer than the pattern */
        "api/v1/jobs/1",                      /* not absolute */
        "/api/v1/jobsX/1",
        "",
    };
    for (size_t i = 0; i < sizeof misses / sizeof misses[0]; i++)
        assert_false(http_match("/api/v1/jobs/{id}", misses[i], ids));
    assert_false(http_match("/api/v1/jobs/{id}/cancel", "/api/v1/jobs/3/retry", ids));
    assert_false(http_match("/healthz", "/healthz/", ids));
    assert_false(http_match("/healthz", "/", ids));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cursor_round_trip),
        cmocka_unit_test(test_cursor_rejects_garbage),
        cmocka_unit_test(test_retry_delay_is_capped_exponential),
        cmocka_unit_test(test_migration_names),
        cmocka_unit_test(test_user_names_and_roles),
        cmocka_unit_test(test_job_states),
        cmocka_unit_test(test_utf8_clean),
        cmocka_unit_test(test_config_env_and_flags),
        cmocka_unit_test(test_route_matching),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
