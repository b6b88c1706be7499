using System.Diagnostics;
using Xunit.Abstractions;
using LoraSharp.Adapters;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Adapters;

/// <summary>RSS checks run alone: other tests' allocations would show up in the process working set.</summary>
[Collection(SerialAdapterTests.Name)]
public class MemoryTests(ITestOutputHelper output)
{
    static long Rss()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        GC.Collect();
        using var p = Process.GetCurrentProcess();
        p.Refresh();
        return p.WorkingSet64;
    }

    [Fact]
    public void Many_training_steps_with_adapters_keep_memory_flat()
    {
        // Small layers but large activations (512 KB each): one leaked activation per step would add ~40 MB.
        manual_seed(4);
        var layers = Enumerable.Range(0, 3).Select(i => ($"blocks.{i}.proj", (nn.Module)nn.Linear(32, 32))).ToList();
        var root = TestTrees.Build(layers);
        using var host = new AdapterHost(root);
        host.FreezeBase();
        host.Create("lora", new AdapterConfig { Rank = 4, Alpha = 4, Dropout = new() { Rank = 0.1, Input = 0.1 } }, ModuleSelector.Suffix("proj"));
        host.Create("lokr_dora", new AdapterConfig { Algorithm = AdapterAlgorithm.LoKr, Rank = 2, Dora = DoraKind.Peft }, ModuleSelector.Glob("blocks.0*"));
        var opt = optim.AdamW(host.TrainableParameters(), 1e-3);
        root.train();
        var leaves = layers.Select(l => (nn.Module<Tensor, Tensor>)l.Item2).ToList();
        void Step()
        {
            using (var scope = NewDisposeScope())
            {
                var x = randn(4, 1024, 32);
                foreach (var l in leaves) x = nn.functional.gelu(l.call(x));
                x.square().mean().backward();
            }
            opt.step();
            opt.zero_grad();
        }
        var sw = Stopwatch.StartNew();
        for (int i = 0; i < 20; i++) Step();
        long start = Rss();
        for (int i = 0; i < 80; i++)
        {
            Step();
            if (i % 20 == 0) { GC.Collect(); GC.WaitForPendingFinalizers(); }
        }
        long grown = Rss() - start;
        output.WriteLine($"100 steps in {sw.ElapsedMilliseconds} ms, RSS growth {grown >> 10} KB");
        Assert.True(grown < 20L << 20, $"RSS grew by {grown >> 20} MB over 80 steps");
    }

    [Fact]
    public void Merge_switching_many_times_keeps_memory_flat()
    {
        manual_seed(5);
        var root = TestTrees.Build(Enumerable.Range(0, 4).Select(i => ($"l{i}", (nn.Module)nn.Linear(256, 256))));
        using var host = new AdapterHost(root);
        var a = host.Create("a", new AdapterConfig { Rank = 8 }, ModuleSelector.All());
        host.Merge();
        for (int i = 0; i < 20; i++) { a.Multiplier = i % 3; host.ApplyPending(); }
        long start = Rss();
        for (int i = 0; i < 300; i++)
        {
            a.Multiplier = i % 5 * 0.25;
            host.ApplyPending();
            if (i % 50 == 0) { host.Unmerge(); host.Merge(); }
        }
        long grown = Rss() - start;
        Assert.True(grown < 20L << 20, $"RSS grew by {grown >> 20} MB over 300 merges");
    }
}
