/* test_buf.c - bounded buffers (common/buf.c): the maximum is enforced and an
 * overflow frees the buffer; empty appends still give a terminated string. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/buf.h"

static void test_empty_append_terminates(void **state) {
    (void)state;
    buf_t b;
    buf_init(&b, 16);
    assert_int_equal(buf_append(&b, "", 0), 0);
    assert_non_null(b.data);
    assert_string_equal(b.data, "");
    buf_free(&b);
    buf_init(&b, 16);
    assert_int_equal(buf_printf(&b, "%s", ""), 0);
    assert_non_null(b.data);
    assert_int_equal(b.len, 0);
    buf_free(&b);
}

static void test_grows_to_the_maximum_and_no_further(void **state) {
    (void)state;
    buf_t b;
    buf_init(&b, 10);
    assert_int_equal(buf_append(&b, "abcd", 4), 0);
    assert_int_equal(buf_printf(&b, "%d%s", 12, "xyzw"), 0); /* exactly 10 */
    assert_int_equal(b.len, 10);
    assert_string_equal(b.data, "abcd12xyzw");
    assert_int_equal(buf_append(&b, "!", 1), -1); /* one past: refused, freed */
    assert_null(b.data);
    assert_int_equal(b.len, 0);
}

static void test_oversized_single_append(void **state) {
    (void)state;
    buf_t b;
    buf_init(&b, 8);
    char big[64];
    memset(big, 'q', sizeof big);
    assert_int_equal(buf_append(&b, big, sizeof big), -1);
    assert_null(b.data);
    /* SIZE_MAX must not wrap the size check. */
    buf_init(&b, 8);
    assert_int_equal(buf_append(&b, "ab", 2), 0);
    assert_int_equal(buf_append(&b, big, SIZE_MAX), -1);
    assert_null(b.data);
}

static void test_steal_and_reset(void **state) {
    (void)state;
    buf_t b;
    buf_init(&b, 100);
    assert_int_equal(buf_append(&b, "hello", 5), 0);
    buf_reset(&b);
    assert_int_equal(b.len, 0);
    assert_string_equal(b.data, "");
    assert_int_equal(buf_append(&b, "world", 5), 0);
    char *s = buf_steal(&b);
    assert_string_equal(s, "world");
    assert_null(b.data);
    free(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_empty_append_terminates),
        cmocka_unit_test(test_grows_to_the_maximum_and_no_further),
        cmocka_unit_test(test_oversized_single_append),
        cmocka_unit_test(test_steal_and_reset),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
