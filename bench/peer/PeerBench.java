// Peer benchmark: Confluent Parallel Consumer (ProcessingOrder.KEY) draining a keyed backlog.
//
// Run by bench/bench_peer_parallel_consumer.py (plain javac + java, classpath = the jars
// bench/peer/pom.xml fetches). One JVM runs every case and repeat on the same topic, each
// with a fresh consumer group from the earliest offset, so the JIT is warm after the first
// (unrecorded) warm-up pass, as it is for a long-running consumer. Prints one JSON line per
// run on stdout and nothing else there; logs go to stderr. Never commits past an
// unprocessed record (that is PC's job: we only check what it committed after close()).
//
//   java -cp 'classes:libs/*' PeerBench --bootstrap HOST:PORT --topic T --records N
//        --case trivial:64:none --case sleep_5ms:128:sleep5 [--repeat 3] [--warmup 1]
//        [--commit-mode PERIODIC_CONSUMER_ASYNCHRONOUS] [--stall-s 30] [--timeout-s 300]
//
// Work kinds: none (trivial), sleepN (Thread.sleep N ms), randomA-B (uniform A..B ms).

import io.confluent.parallelconsumer.ParallelConsumerOptions;
import io.confluent.parallelconsumer.ParallelConsumerOptions.CommitMode;
import io.confluent.parallelconsumer.ParallelConsumerOptions.ProcessingOrder;
import io.confluent.parallelconsumer.ParallelStreamProcessor;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.atomic.AtomicLong;
import java.util.stream.Collectors;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

public final class PeerBench {

  static boolean IGNORE_AUTOCOMMIT_CHECK = false;

  record Case(String name, int concurrency, String work) {}

  public static void main(String[] argv) throws Exception {
    Map<String, String> opts = new HashMap<>();
    List<Case> cases = new ArrayList<>();
    for (int i = 0; i < argv.length; i++) {
      String key = argv[i];
      if (!key.startsWith("--") || i + 1 >= argv.length) {
        die("bad argument: " + key);
      }
      String value = argv[++i];
      if (key.equals("--case")) {
        String[] p = value.split(":");
        if (p.length != 3) {
          die("--case wants name:concurrency:work, got " + value);
        }
        cases.add(new Case(p[0], Integer.parseInt(p[1]), p[2]));
      } else {
        opts.put(key.substring(2), value);
      }
    }
    String bootstrap = required(opts, "bootstrap");
    String topic = required(opts, "topic");
    long records = Long.parseLong(required(opts, "records"));
    int repeat = Integer.parseInt(opts.getOrDefault("repeat", "3"));
    int warmup = Integer.parseInt(opts.getOrDefault("warmup", "1"));
    CommitMode mode =
        CommitMode.valueOf(opts.getOrDefault("commit-mode", "PERIODIC_CONSUMER_ASYNCHRONOUS"));
    double stallS = Double.parseDouble(opts.getOrDefault("stall-s", "30"));
    double timeoutS = Double.parseDouble(opts.getOrDefault("timeout-s", "300"));
    IGNORE_AUTOCOMMIT_CHECK =
        Boolean.parseBoolean(opts.getOrDefault("ignore-autocommit-check", "false"));
    if (cases.isEmpty()) {
      die("no --case given");
    }
    // Warm-up passes (first case, unrecorded): a fresh JVM interprets and JIT-compiles.
    for (int w = 0; w < warmup; w++) {
      Case c = cases.get(0);
      Result r = runOnce(bootstrap, topic, records, c, mode, stallS, timeoutS);
      System.err.printf("peer: warm-up %s: %s%n", c.name, r.status);
    }
    int failures = 0;
    for (int run = 0; run < repeat; run++) {
      for (Case c : cases) {
        Result r = runOnce(bootstrap, topic, records, c, mode, stallS, timeoutS);
        System.out.println(r.json(run));
        System.out.flush();
        if (!r.status.equals("ok")) {
          failures++;
        }
      }
    }
    System.exit(failures == 0 ? 0 : 3);
  }

  static final class Result {
    String status = "ok";
    Case c;
    CommitMode mode;
    long expected;
    long processed;
    long started;
    long orderViolations;
    double elapsedS;
    double closeS;
    long committed;
    long pausedPartitions = -1;
    double load1 = -1;
    String detail = "";

    String json(int run) {
      double rate = elapsedS > 0 ? processed / elapsedS : 0.0;
      return String.format(
          java.util.Locale.ROOT,
          "{\"event\":\"result\",\"case\":\"%s\",\"run\":%d,\"status\":\"%s\","
              + "\"concurrency\":%d,\"work\":\"%s\",\"commit_mode\":\"%s\",\"expected\":%d,"
              + "\"started\":%d,\"processed\":%d,\"elapsed_s\":%.4f,\"throughput\":%.1f,"
              + "\"order_violations\":%d,\"committed\":%d,\"close_s\":%.3f,"
              + "\"paused_partitions\":%d,\"load1\":%.2f,\"detail\":\"%s\"}",
          c.name, run, status, c.concurrency, c.work, mode, expected, started, processed, elapsedS, rate,
          orderViolations, committed, closeS, pausedPartitions, load1, detail.replace("\"", "'"));
    }
  }

  static Result runOnce(
      String bootstrap,
      String topic,
      long records,
      Case c,
      CommitMode mode,
      double stallS,
      double timeoutS)
      throws Exception {
    String group = "peer-pc-" + UUID.randomUUID().toString().substring(0, 8);
    Properties props = new Properties();
    props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    props.put(ConsumerConfig.GROUP_ID_CONFIG, group);
    // PC coordinates offsets itself: Kafka's auto-commit must be off (its README).
    props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
    props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
    props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
    KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(props);
    ParallelConsumerOptions<byte[], byte[]> options =
        ParallelConsumerOptions.<byte[], byte[]>builder()
            .ordering(ProcessingOrder.KEY)
            .maxConcurrency(c.concurrency)
            .commitMode(mode)
            .consumer(consumer)
            // Only for kafka-clients 4.x, whose KafkaConsumer PC 0.5.3.x cannot inspect.
            .ignoreReflectiveAccessExceptionsForAutoCommitDisabledCheck(IGNORE_AUTOCOMMIT_CHECK)
            .build();
    ParallelStreamProcessor<byte[], byte[]> pc =
        ParallelStreamProcessor.createEosStreamProcessor(options);
    AtomicLong started = new AtomicLong(); // handler calls begun (in flight = started - processed)
    AtomicLong processed = new AtomicLong();
    AtomicLong violations = new AtomicLong();
    AtomicLong firstNs = new AtomicLong(0);
    AtomicLong lastNs = new AtomicLong(0);
    // Per-key ordering check: KEY order means a key's records run in offset order, once.
    ConcurrentHashMap<String, Long> lastOffset = new ConcurrentHashMap<>();
    Work work = Work.parse(c.work);
    pc.subscribe(List.of(topic));
    pc.poll(
        ctx -> {
          long now = System.nanoTime();
          firstNs.compareAndSet(0, now);
          started.incrementAndGet();
          var rec = ctx.getSingleConsumerRecord();
          String k = rec.partition() + "/" + new String(rec.key(), java.nio.charset.StandardCharsets.UTF_8);
          long off = rec.offset();
          Long prev = lastOffset.put(k, off);
          if (prev != null && prev >= off) {
            violations.incrementAndGet();
          }
          work.run();
          long n = processed.incrementAndGet();
          if (n == records) {
            lastNs.set(System.nanoTime());
          }
        });
    Result r = new Result();
    r.c = c;
    r.mode = mode;
    r.expected = records;
    long start = System.nanoTime();
    long lastSeen = -1;
    long lastChange = start;
    while (true) {
      long n = processed.get();
      long now = System.nanoTime();
      if (n >= records) {
        break;
      }
      if (n != lastSeen) {
        lastSeen = n;
        lastChange = now;
      }
      if ((now - lastChange) / 1e9 > stallS) {
        r.status = "stalled";
        r.detail = "no progress for " + stallS + " s at " + n + "/" + records;
        break;
      }
      if ((now - start) / 1e9 > timeoutS) {
        r.status = "timeout";
        r.detail = "timeout at " + n + "/" + records;
        break;
      }
      Thread.sleep(20); // a progress poll, not synchronisation: we read a counter
    }
    r.processed = processed.get();
    r.started = started.get();
    r.load1 =
        java.lang.management.ManagementFactory.getOperatingSystemMXBean().getSystemLoadAverage();
    r.orderViolations = violations.get();
    long end = r.status.equals("ok") ? lastNs.get() : System.nanoTime();
    r.elapsedS = firstNs.get() == 0 ? 0.0 : (end - firstNs.get()) / 1e9;
    if (pc instanceof io.confluent.parallelconsumer.internal.AbstractParallelEoSStreamProcessor<?, ?> a) {
      r.pausedPartitions = a.getPausedPartitionSize();
    }
    long closeStart = System.nanoTime();
    try {
      pc.closeDontDrainFirst(Duration.ofSeconds(30)); // commits what completed, closes the consumer
    } catch (Exception e) {
      r.detail += " close failed: " + e;
    }
    r.closeS = (System.nanoTime() - closeStart) / 1e9;
    r.committed = committedCount(bootstrap, topic, group);
    if (r.status.equals("ok") && r.orderViolations > 0) {
      r.status = "order_violations";
    }
    System.err.printf(
        "peer: %s c=%d %s: %d/%d in %.2f s, committed %d%n",
        c.name, c.concurrency, r.status, r.processed, records, r.elapsedS, r.committed);
    return r;
  }

  /** Sum over partitions of the group's committed offset (records covered by commits). */
  static long committedCount(String bootstrap, String topic, String group) {
    Properties props = new Properties();
    props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    props.put(ConsumerConfig.GROUP_ID_CONFIG, group);
    props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
    props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
    props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
    try (KafkaConsumer<byte[], byte[]> c = new KafkaConsumer<>(props)) {
      List<PartitionInfo> parts = c.partitionsFor(topic, Duration.ofSeconds(10));
      Set<TopicPartition> tps =
          parts.stream()
              .map(p -> new TopicPartition(topic, p.partition()))
              .collect(Collectors.toSet());
      Map<TopicPartition, OffsetAndMetadata> got = c.committed(tps, Duration.ofSeconds(10));
      long sum = 0;
      for (OffsetAndMetadata om : got.values()) {
        if (om != null) {
          sum += om.offset();
        }
      }
      return sum;
    } catch (Exception e) {
      System.err.println("peer: cannot read committed offsets: " + e);
      return -1;
    }
  }

  interface Work {
    void run();

    static Work parse(String spec) {
      if (spec.equals("none")) {
        return () -> {};
      }
      if (spec.startsWith("sleep")) {
        long ms = Long.parseLong(spec.substring(5));
        return () -> sleep(ms);
      }
      if (spec.startsWith("random")) {
        String[] ab = spec.substring(6).split("-");
        int a = Integer.parseInt(ab[0]);
        int b = Integer.parseInt(ab[1]);
        return () -> sleep(ThreadLocalRandom.current().nextInt(a, b + 1));
      }
      die("unknown work " + spec);
      return null;
    }
  }

  static void sleep(long ms) {
    if (ms <= 0) {
      return;
    }
    try {
      Thread.sleep(ms);
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
    }
  }

  static String required(Map<String, String> opts, String key) {
    String v = opts.get(key);
    if (v == null) {
      die("missing --" + key);
    }
    return v;
  }

  static void die(String msg) {
    System.err.println("peer: " + msg);
    System.exit(2);
  }
}
