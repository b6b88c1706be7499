using System.Globalization;
using System.Text.Json;
using LoraSharp.Adapters;
using LoraSharp.IO;
using LoraSharp.Training.Optim;
using static TorchSharp.torch;

namespace LoraSharp.Training.Diffusion;

/// <summary>
/// A resumable training state folder: <c>adapter.safetensors</c> (every trainable adapter parameter by name),
/// <c>optimizer.safetensors</c> (state tensors; scalars in the metadata), <c>rng.safetensors</c> (the torch CPU
/// generator state) and <c>state.json</c> (epoch, step, seed). Written to a temporary folder and renamed, so a crash
/// never leaves half a state.
/// </summary>
public sealed record TrainState(int Epoch, long Step, long Seed)
{
    public static void Save(string folder, AdapterHost host, ITrainingOptimizer optimizer, int epoch, long step, long seed)
    {
        var parent = Path.GetDirectoryName(Path.GetFullPath(folder))!;
        var tmp = Path.Combine(parent, $".{Path.GetFileName(folder)}.{Environment.ProcessId}.tmp");
        if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
        Directory.CreateDirectory(tmp);
        using (var scope = NewDisposeScope())
        {
            SafetensorsWriter.Write(Path.Combine(tmp, "adapter.safetensors"),
                host.NamedTrainableParameters().Select(p => new KeyValuePair<string, Tensor>(p.Name, p.Param.detach())).ToList());
            var (tensors, scalars) = optimizer.StateDict();
            SafetensorsWriter.Write(Path.Combine(tmp, "optimizer.safetensors"), tensors.ToList(), scalars);
            SafetensorsWriter.Write(Path.Combine(tmp, "rng.safetensors"), new KeyValuePair<string, Tensor>[] { new("torch_cpu", get_rng_state()) });
            foreach (var t in tensors.Values) t.Dispose();
        }
        File.WriteAllText(Path.Combine(tmp, "state.json"), JsonSerializer.Serialize(new Dictionary<string, string>
        {
            ["epoch"] = epoch.ToString(CultureInfo.InvariantCulture),
            ["step"] = step.ToString(CultureInfo.InvariantCulture),
            ["seed"] = seed.ToString(CultureInfo.InvariantCulture),
        }));
        var old = folder + ".old";
        if (Directory.Exists(old)) Directory.Delete(old, true);
        if (Directory.Exists(folder)) Directory.Move(folder, old);
        Directory.Move(tmp, folder);
        if (Directory.Exists(old)) Directory.Delete(old, true);
    }

    /// <summary>Restores adapter parameters, optimizer state and the RNG; returns epoch / step / seed.</summary>
    public static TrainState Load(string folder, AdapterHost host, ITrainingOptimizer optimizer)
    {
        var json = Path.Combine(folder, "state.json");
        if (!File.Exists(json)) throw new LoraSharpException("not a training state folder (state.json is missing)", folder, "resume");
        var d = JsonSerializer.Deserialize<Dictionary<string, string>>(File.ReadAllText(json))
            ?? throw new LoraSharpException("state.json is empty", json, "resume");
        using (var src = SafetensorsFile.Open(Path.Combine(folder, "adapter.safetensors")))
        using (var noGrad = no_grad())
        {
            foreach (var (name, p) in host.NamedTrainableParameters())
            {
                if (!src.Contains(name)) throw new LoraSharpException("the saved adapter lacks a parameter of this run (different network settings?)", src.FilePath, name);
                using var t = src.Load(name, p.dtype);
                if (!t.shape.SequenceEqual(p.shape))
                    throw new LoraSharpException($"shape [{string.Join(", ", t.shape)}] differs from this run's [{string.Join(", ", p.shape)}]", src.FilePath, name);
                p.copy_(t);
            }
        }
        using (var src = SafetensorsFile.Open(Path.Combine(folder, "optimizer.safetensors")))
        {
            var tensors = src.Keys.ToDictionary(k => k, k => src.Load(k));
            optimizer.LoadStateDict(tensors, src.Metadata);
            foreach (var t in tensors.Values) t.Dispose();
        }
        using (var src = SafetensorsFile.Open(Path.Combine(folder, "rng.safetensors")))
        using (var rng = src.Load("torch_cpu"))
            set_rng_state(rng);
        return new TrainState(int.Parse(d["epoch"], CultureInfo.InvariantCulture), long.Parse(d["step"], CultureInfo.InvariantCulture), long.Parse(d["seed"], CultureInfo.InvariantCulture));
    }
}
