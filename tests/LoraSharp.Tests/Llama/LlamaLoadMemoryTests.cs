using System.Diagnostics;
using System.Runtime.InteropServices;
using LoraSharp.IO;
using LoraSharp.Models.Llama;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Llama;

[CollectionDefinition("Llama memory", DisableParallelization = true)]
public sealed class LlamaMemoryCollection;

/// <summary>
/// Loading a ~480 MB checkpoint must not hold two copies of the weights. Measured in this process, with no other test
/// running (the collection disables parallelization): free heap is returned to the OS (malloc_trim), the kernel's
/// peak-RSS mark is reset (writing 5 to /proc/self/clear_refs), and the growth is VmHWM after the load minus VmRSS
/// before it. A background sampler of VmRSS every 2 ms backs this up where clear_refs is not allowed.
/// </summary>
[Collection("Llama memory")]
public class LlamaLoadMemoryTests(ITestOutputHelper output)
{
    [DllImport("libc", EntryPoint = "malloc_trim")]
    static extern int MallocTrim(nuint pad);

    static long StatusKb(string field)
    {
        foreach (var line in File.ReadLines("/proc/self/status"))
            if (line.StartsWith(field + ":", StringComparison.Ordinal))
                return long.Parse(line[(field.Length + 1)..].Trim().Split(' ')[0]);
        throw new InvalidOperationException($"{field} not in /proc/self/status");
    }

    static void ReleaseFreeMemory()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        GC.Collect();
        if (OperatingSystem.IsLinux()) MallocTrim(0);
    }

    [Fact]
    public void Loading_a_480MB_checkpoint_grows_peak_rss_by_at_most_1_3x_the_weights()
    {
        if (!OperatingSystem.IsLinux()) return; // /proc is Linux-only
        using var dir = new TempDir();
        var config = LlamaConfig.Parse("""
            { "model_type": "llama", "vocab_size": 16000, "hidden_size": 1024, "intermediate_size": 2816,
              "num_hidden_layers": 7, "num_attention_heads": 16, "num_key_value_heads": 16, "tie_word_embeddings": false }
            """);
        File.WriteAllText(Path.Combine(dir.Path, "config.json"), """
            { "model_type": "llama", "vocab_size": 16000, "hidden_size": 1024, "intermediate_size": 2816,
              "num_hidden_layers": 7, "num_attention_heads": 16, "num_key_value_heads": 16, "tie_word_embeddings": false }
            """);
        long weightBytes = config.ParameterCount() * 4;

        // Write the checkpoint tensor by tensor (never the whole model in memory) with random values.
        var stopwatch = Stopwatch.StartNew();
        using (var shapes = new LlamaForCausalLM(config, ScalarType.Float32, META))
        {
            var generator = new Generator(1);
            var pending = shapes.named_parameters().Select(p => new PendingTensor(p.name, ScalarType.Float32, p.parameter.shape,
                () => p.name.EndsWith("norm.weight") ? ones(p.parameter.shape) : randn(p.parameter.shape, generator: generator) * 0.02f)).ToList();
            SafetensorsWriter.Write(Path.Combine(dir.Path, "model.safetensors"), pending);
        }
        var writeTime = stopwatch.Elapsed;

        ReleaseFreeMemory();
        bool hwmReset = TryResetPeak();
        long before = StatusKb("VmRSS") * 1024;
        long sampledPeak = before;
        using var stop = new CancellationTokenSource();
        var sampler = new Thread(() =>
        {
            while (!stop.IsCancellationRequested)
            {
                sampledPeak = Math.Max(sampledPeak, StatusKb("VmRSS") * 1024);
                Thread.Sleep(2);
            }
        });
        sampler.Start();

        stopwatch.Restart();
        using var model = LlamaCheckpoint.Load(dir.Path);
        var loadTime = stopwatch.Elapsed;
        stop.Cancel();
        sampler.Join();
        long peak = hwmReset ? Math.Max(StatusKb("VmHWM") * 1024, sampledPeak) : sampledPeak;
        long growth = peak - before;

        output.WriteLine($"weights {weightBytes / 1e6:F0} MB; peak RSS growth {growth / 1e6:F0} MB = {(double)growth / weightBytes:F2}x " +
                         $"(VmHWM reset: {hwmReset}); write {writeTime.TotalSeconds:F1} s, load {loadTime.TotalSeconds:F1} s");
        Assert.True(growth <= 1.3 * weightBytes, $"peak RSS grew {growth / 1e6:F0} MB for {weightBytes / 1e6:F0} MB of weights");
        // The measurement sees the weights themselves (so the bound above is not vacuous).
        Assert.True(growth >= 0.9 * weightBytes, $"peak RSS grew only {growth / 1e6:F0} MB for {weightBytes / 1e6:F0} MB of weights: measurement broken?");
        using var scope = NewDisposeScope();
        Assert.True(model.Model.Layers[6].Mlp.DownProj.weight!.abs().sum().item<float>() > 0);
    }

    static readonly Device META = new(DeviceType.META);

    static bool TryResetPeak()
    {
        try
        {
            File.WriteAllText("/proc/self/clear_refs", "5");
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return false;
        }
    }
}
